"""The metrics of `piflow eval`, on feature networks given by the caller (Inception-free: any nn.Module).

- FID: torchmetrics' FrechetInceptionDistance with a custom `feature` module (no torch-fidelity download);
  against reference statistics (mu, sigma of an .npz, e.g. ADM's ImageNet stats): the Frechet distance formula.
- IS: torchmetrics' InceptionScore with a custom module returning class logits.
- CLIP score: 100 * max(cos(image, text), 0) averaged (the torchmetrics definition) from a transformers
  CLIPModel's projected features.
- Diversity within a prompt: mean pairwise cosine distance of image features across seeds, averaged over prompts.
- Precision / recall: k-NN manifolds of real and generated features (Kynkaanniemi et al. 2019, k = 3).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class FloatFeatures(nn.Module):
    """Wraps a feature net so torchmetrics' uint8 probe and our float images in [0, 1] both work:
    uint8 inputs are scaled to [0, 1], then everything is mapped to the net's input range [-1, 1]."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        with torch.no_grad():
            return self.net(x * 2 - 1).float()


def fid(features: nn.Module, real: torch.Tensor, fake: torch.Tensor, batch: int = 256) -> float:
    """FID between two image sets (N, C, H, W) in [0, 1] in the space of `features` (images -> (N, d))."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=FloatFeatures(features), input_img_size=tuple(real.shape[1:]))
    for name, imgs in (("real", real), ("fake", fake)):
        for i in range(0, len(imgs), batch):
            metric.update(imgs[i:i + batch], real=name == "real")
    return float(metric.compute())


def frechet_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) in float64 (reference-statistics FID)."""
    from scipy import linalg

    covmean, _ = linalg.sqrtm(np.asarray(sigma_a, np.float64) @ np.asarray(sigma_b, np.float64), disp=False)
    diff = np.asarray(mu_a, np.float64) - np.asarray(mu_b, np.float64)
    return float(diff @ diff + np.trace(sigma_a + sigma_b - 2.0 * covmean.real))


def feature_stats(features: nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = FloatFeatures(features)(images).double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def inception_score(logits_net: nn.Module, images: torch.Tensor, splits: int = 1) -> float:
    from torchmetrics.image.inception import InceptionScore

    metric = InceptionScore(feature=FloatFeatures(logits_net), splits=splits)
    metric.update(images)
    return float(metric.compute()[0])


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """100 * max(cos, 0) averaged over matched (image, text) pairs; features (N, d)."""
    cos = nn.functional.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
    return float(100 * cos.clamp(min=0).mean())


def within_prompt_diversity(features: torch.Tensor, groups: list[int]) -> float:
    """Mean over prompts of the mean pairwise cosine distance between the seeds' features.
    features (N, d); groups (N,) prompt index per row; prompts with one image are left out."""
    g = torch.as_tensor(groups)
    f = nn.functional.normalize(features.double(), dim=-1)
    per = []
    for p in g.unique():
        x = f[g == p]
        n = len(x)
        if n > 1:
            d = 1 - x @ x.T
            per.append(float(d.sum() / (n * (n - 1))))  # the diagonal is 0
    return float(np.mean(per)) if per else float("nan")


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision / recall: a fake sample is precise when it lies inside some real sample's k-NN ball;
    a real sample is recalled when it lies inside some fake sample's k-NN ball. real, fake: (N, d) features."""
    def radii(x: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # the k-th neighbour besides the point itself

    real, fake = real.double(), fake.double()
    r_real, r_fake = radii(real), radii(fake)
    d = torch.cdist(fake, real)  # (N_fake, N_real)
    precision = (d <= r_real[None]).any(1).double().mean()
    recall = (d.T <= r_fake[None]).any(1).double().mean()
    return float(precision), float(recall)
