"""`piflow eval` metrics (trainer/evaluation/metrics.py) on tiny feature networks against independent references:
FID (torchmetrics with a custom module) equals the Frechet formula on the same features; IS, CLIP score,
diversity and precision/recall on constructed inputs with known values."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trainer.evaluation.metrics import (FloatFeatures, feature_stats, fid, frechet_from_stats, inception_score,
                                        precision_recall, clip_score, within_prompt_diversity)


def tiny_net(seed=0, out=6):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, out)).eval()


def test_fid_equals_the_frechet_formula_on_the_same_features():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(300, 1, 8, 8, generator=g)
    b = (torch.rand(300, 1, 8, 8, generator=g) * 0.7 + 0.2)
    net = tiny_net()
    got = fid(net, a, b, batch=128)
    fa, fb = (FloatFeatures(net)(x).double().numpy() for x in (a, b))
    from scipy import linalg

    ca, cb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    ref = ((fa.mean(0) - fb.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert abs(got - ref) < 1e-6 * max(1.0, ref) and got > 1e-3
    assert fid(net, a, a) < 1e-6
    assert abs(frechet_from_stats(*feature_stats(net, a), *feature_stats(net, b)) - ref) < 1e-6 * max(1.0, ref)


def test_inception_score_extremes():
    class Logits(nn.Module):
        def __init__(self, confident):
            super().__init__()
            self.confident = confident

        def forward(self, x):  # class = index of the brightest of 4 quadrants, or no preference
            q = torch.stack([x[:, 0, :4, :4].mean((1, 2)), x[:, 0, :4, 4:].mean((1, 2)),
                             x[:, 0, 4:, :4].mean((1, 2)), x[:, 0, 4:, 4:].mean((1, 2))], 1)
            return 1e3 * q if self.confident else torch.zeros_like(q)

    imgs = torch.zeros(40, 1, 8, 8)
    for i in range(40):
        r, c = divmod(i % 4, 2)
        imgs[i, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = 1
    assert abs(inception_score(Logits(True), imgs) - 4.0) < 1e-3  # confident, evenly spread over 4 classes
    assert abs(inception_score(Logits(False), imgs) - 1.0) < 1e-6


def test_clip_score_diversity_precision_recall_constructed():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert clip_score(torch.tensor([[2.0, 0.0], [0.0, 3.0]]), t) == pytest.approx(100.0)
    assert clip_score(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), t) == pytest.approx(0.0)
    same = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    assert within_prompt_diversity(same, [0, 0, 0, 1, 1, 1]) == pytest.approx(0.0)
    ortho = torch.eye(3).repeat(2, 1)
    assert within_prompt_diversity(ortho, [0, 0, 0, 1, 1, 1]) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(1)
    real = torch.randn(200, 4, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    p, r = precision_recall(real, real + 100.0)
    assert p == 0.0 and r == 0.0
    # mode collapse: every fake near one real point -> precise, but recalls almost nothing
    collapsed = real[:1] + 1e-3 * torch.randn(200, 4, generator=g)
    p, r = precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.1
