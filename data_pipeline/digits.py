"""scikit-learn's 8x8 digits as a tiny text-to-image data set (the embedded default, DESIGN.md §9).

Images are scaled from [0, 16] to [-1, 1] and used directly as 1-channel 8x8 "latents" (no VAE at this size).
A fixed seeded split holds out 20% of every class for evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def prompt_for(label: int) -> str:
    return f"a handwritten {DIGIT_WORDS[label]}"


def label_for(prompt: str) -> int:
    """Inverse of `prompt_for`; raises ValueError naming the prompt when it names no digit."""
    words = prompt.lower().split()
    for label, word in enumerate(DIGIT_WORDS):
        if word in words:
            return label
    raise ValueError(f"prompt {prompt!r} names no digit (expected one of {', '.join(DIGIT_WORDS)})")


@dataclass
class DigitSplit:
    images: torch.Tensor  # (N, 1, 8, 8) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64


def load_digits_split(split: str, seed: int = 0, holdout: float = 0.2) -> DigitSplit:
    """`split` is 'train' or 'test'; the split is stratified and fixed by `seed`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images.astype(np.float32) / 8.0 - 1.0
    labels = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(holdout * len(idx)))])
    mask = np.zeros(len(labels), dtype=bool)
    mask[np.asarray(test_idx)] = True
    if split == "train":
        mask = ~mask
    return DigitSplit(torch.from_numpy(images[mask]).unsqueeze(1), torch.from_numpy(labels[mask]))


def digit_prompts(repeats: int = 1) -> list[str]:
    """Every digit prompt, `repeats` times (the prompt set the demo's shards are built from)."""
    return [prompt_for(c) for _ in range(repeats) for c in range(10)]
