"""Evaluation of digit generators: a classifier trained on real digits (train split), prompt accuracy,
Frechet distance in the classifier's feature space against held-out real digits, and within-prompt diversity.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from data_pipeline.digits import load_digits_split


class DigitClassifier(nn.Module):
    def __init__(self, hidden: int = 128, feature_dim: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, feature_dim),
                                   nn.GELU())
        self.out = nn.Linear(feature_dim, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:  # (N, 1, 8, 8) -> (N, feature_dim)
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(images))


def train_classifier(seed: int = 0, epochs: int = 300) -> tuple[DigitClassifier, float]:
    """Full-batch AdamW with light noise augmentation; returns (classifier, held-out accuracy)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train, test = load_digits_split("train"), load_digits_split("test")
    clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(epochs):
        x = train.images + 0.1 * torch.randn(train.images.shape, generator=g)
        loss = nn.functional.cross_entropy(clf(x), train.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(test.images).argmax(1) == test.labels).float().mean().item()
    return clf, acc


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}), in float64."""
    from scipy import linalg

    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * covmean))


def mean_pairwise_distance(images: torch.Tensor) -> float:
    flat = images.reshape(len(images), -1).double()
    d = torch.cdist(flat, flat)
    n = len(flat)
    return float(d.sum() / (n * (n - 1)))


def real_diversity(split: str = "test") -> float:
    """Mean over classes of the within-class mean pairwise distance of real digits."""
    real = load_digits_split(split)
    return float(np.mean([mean_pairwise_distance(real.images[real.labels == c]) for c in range(10)]))


@torch.no_grad()
def evaluate_digits(clf: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """images (N, 1, 8, 8) in [-1, 1] generated for prompts of digit `labels` (N,)."""
    images = images.float().clamp(-1, 1)
    test = load_digits_split("test")
    accuracy = (clf(images).argmax(1) == labels).float().mean().item()
    fd = frechet_distance(clf.features(images).numpy(), clf.features(test.images).numpy())
    per_class = [mean_pairwise_distance(images[labels == c]) for c in range(10) if int((labels == c).sum()) > 1]
    diversity = float(np.mean(per_class)) / real_diversity("test")
    return {"prompt_accuracy": accuracy, "frechet_distance": fd, "diversity": diversity}
