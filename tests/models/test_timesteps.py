"""Timesteps: warp, step grids, substep counts (PIFLOW.md §8 property 10) and the training-segment law (11)."""
from fractions import Fraction

import pytest
import torch

from models.timesteps import sample_training_segment, step_grid, substep_counts, unwarp, warp


def _warp_exact(tau: Fraction, shift: Fraction) -> Fraction:
    # Exact rational reference of sigma = s tau / (1 + (s - 1) tau).
    return shift * tau / (1 + (shift - 1) * tau)


def test_warp_unwarp_inverse_and_identity_at_shift_one():
    tau = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (1.0, 3.2, 0.5):
        assert torch.allclose(unwarp(warp(tau, shift), shift), tau, atol=1e-15, rtol=0)
    assert torch.equal(warp(tau, 1.0), tau)
    assert warp(0.5, 3.2) == pytest.approx(float(_warp_exact(Fraction(1, 2), Fraction(16, 5))), abs=1e-15)
    assert warp(1.0, 3.2) == 1.0 and warp(0.0, 3.2) == 0.0


@pytest.mark.parametrize(
    "nfe, f, shift, taus, sigmas, counts",
    [
        (4, 0.5, 3.2, [1, 5 / 7, 3 / 7, 1 / 7, 0], [1, 0.888889, 0.705882, 0.347826, 0], [37, 37, 37, 18]),
        (8, 0.5, 3.2, None,
         [1, 0.954128, 0.897959, 0.827586, 0.736842, 0.615385, 0.444444, 0.186047, 0], [17] * 7 + [9]),
        (1, 1.0, 1.0, [1, 0], [1, 0], [128]),
        (2, 1.0, 1.0, [1, 0.5, 0], [1, 0.5, 0], [64, 64]),
    ],
)
def test_property_10_grids_and_substep_counts(nfe, f, shift, taus, sigmas, counts):
    got_taus, got_sigmas = step_grid(nfe, f, shift)
    assert got_taus.dtype == torch.float64 and got_taus.shape == (nfe + 1,)
    assert got_sigmas.shape == (nfe + 1,) and got_sigmas[-1] == 0 and got_taus[-1] == 0
    if taus is not None:
        assert torch.allclose(got_taus, torch.tensor(taus, dtype=torch.float64), atol=1e-15, rtol=0)
    # The quoted sigmas are rounded to 6 decimals; check them, and the exact rationals to 1e-15.
    assert torch.allclose(got_sigmas, torch.tensor(sigmas, dtype=torch.float64), atol=5e-7, rtol=0)
    b = Fraction(1) / (nfe - 1 + Fraction(f).limit_denominator(100))
    s = Fraction(shift).limit_denominator(100)
    exact_taus = [1 - k * b for k in range(nfe)] + [Fraction(0)]
    exact_sigmas = [float(_warp_exact(t, s)) for t in exact_taus]
    assert torch.allclose(got_sigmas, torch.tensor(exact_sigmas, dtype=torch.float64), atol=1e-15, rtol=0)
    assert substep_counts(got_taus) == counts
    assert abs(sum(counts) - 128) <= 1


def test_property_11_training_segment_histogram():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    tau_src, segment = sample_training_segment(n, 4, 0.5, generator=g)
    assert tau_src.shape == (n,) and segment.shape == (n,)
    starts = torch.tensor([1, 5 / 7, 3 / 7, 1 / 7], dtype=torch.float64)
    lengths = torch.tensor([2 / 7, 2 / 7, 2 / 7, 1 / 7], dtype=torch.float64)
    which = (tau_src[:, None] - starts[None]).abs().argmin(1)
    # every sample sits exactly on a segment start and carries that segment's length
    assert torch.allclose(tau_src, starts[which], atol=1e-15, rtol=0)
    assert torch.allclose(segment, lengths[which], atol=1e-15, rtol=0)
    freq = torch.bincount(which, minlength=4).double() / n
    # probability = segment length; binomial std at n = 2e5 is < 1.1e-3
    assert torch.allclose(freq, lengths, atol=5e-3, rtol=0)

    # ImageNet 1 NFE: always tau_src = 1, segment 1. 2 NFE (f = 1): {1, 0.5} with probability 1/2 each.
    t1, s1 = sample_training_segment(1000, 1, 1.0, generator=g)
    assert torch.all(t1 == 1) and torch.all(s1 == 1)
    t2, s2 = sample_training_segment(n, 2, 1.0, generator=g)
    assert set(t2.tolist()) == {1.0, 0.5} and torch.all(s2 == 0.5)
    assert abs((t2 == 1).double().mean().item() - 0.5) < 5e-3


def test_segment_boundaries_follow_ceil_rule(monkeypatch):
    # The map tau -> segment, on a deterministic sweep just either side of each boundary: tau in
    # ((j - 2 + f) b, (j - 1 + f) b] belongs to segment j. sample_training_segment uses tau = 1 - U.
    import models.timesteps as ts

    nfe, f = 4, 0.5
    b = 1 / (nfe - 1 + f)
    taus = torch.tensor([1e-4, 0.5 * b - 1e-9, 0.5 * b + 1e-9, 1.5 * b - 1e-9, 1.5 * b + 1e-9, 2.5 * b - 1e-9,
                         2.5 * b + 1e-9, 1.0], dtype=torch.float64)
    expected_j = [1, 1, 2, 2, 3, 3, 4, 4]
    monkeypatch.setattr(ts.torch, "rand", lambda *a, **k: (1 - taus))
    tau_src, seg = sample_training_segment(len(taus), nfe, f)
    monkeypatch.undo()
    exp = torch.tensor([(j - 1 + f) * b for j in expected_j], dtype=torch.float64)
    assert torch.allclose(tau_src, exp, atol=1e-15, rtol=0)
    assert seg.tolist() == pytest.approx([f * b if j == 1 else b for j in expected_j], abs=1e-15)
