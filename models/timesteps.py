"""Raw time tau, noise level sigma, the shift warp, step grids and substep counts (PIFLOW.md §1.2, §3.1, §3.2, §4.1).

Conventions: sigma = 1 is pure noise, sigma = 0 is data. Raw time tau in [0, 1] is the uniform clock on which step
lengths and substeps are measured; sigma = warp(tau, shift). Schedules are computed in float64 so the rounding of
substep counts and the grid values are reproducible; policies cast what they receive to their own dtype.
"""
from __future__ import annotations

import hashlib
import math

import torch

# Lower clamp of sampled training times (PIFLOW.md §3.1).
MIN_TAU = 1e-4


def warp(tau, shift: float):
    """sigma = s * tau / (1 + (s - 1) * tau); works on floats and tensors."""
    return shift * tau / (1 + (shift - 1) * tau)


def unwarp(sigma, shift: float):
    """tau = sigma / (s + (1 - s) * sigma); the inverse of `warp`."""
    return sigma / (shift + (1 - shift) * sigma)


def num_substeps(delta_tau: torch.Tensor, total_substeps: float = 128) -> torch.Tensor:
    """Substeps for a raw-time span: max(1, round(delta_tau * total_substeps)) (PIFLOW.md §3.2).

    We use `round` (the piFlow code; LakonLab 0.2 uses `ceil`), which reproduces the substep lists quoted in
    §3.2/§4.1. torch.round rounds halves to even, like Python's round(); exact halves do not occur on the
    grids we use (e.g. 2/7 * 128 = 36.57). delta_tau: float64 tensor of any shape -> int64 tensor, same shape.
    """
    return torch.round(delta_tau.to(torch.float64) * total_substeps).to(torch.int64).clamp(min=1)


def step_grid(nfe: int, final_step_scale: float, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's step grid (FlowMapSDE.set_timesteps, PIFLOW.md §4.1).

    tau_k = 1 - k * b for k = 0..nfe-1 with b = 1 / (nfe - 1 + f), followed by 0, so every step has raw
    length b except the last (f * b). Returns (taus, sigmas), each float64 of shape (nfe + 1,).
    """
    b = base_step(nfe, final_step_scale)
    k = torch.arange(nfe, dtype=torch.float64)
    taus = torch.cat([(1.0 - k * b).clamp(min=0.0), torch.zeros(1, dtype=torch.float64)])
    sigmas = warp(taus, shift)
    return taus, sigmas


def substep_counts(taus: torch.Tensor, total_substeps: float = 128) -> list[int]:
    """Substeps of each step of a grid: max(1, round((tau_k - tau_{k+1}) * total_substeps)) (PIFLOW.md §3.2).

    E.g. 4 NFE, f = 0.5: [37, 37, 37, 18] (sums to 129, not 128, because each step rounds on its own).
    """
    taus = torch.as_tensor(taus, dtype=torch.float64)
    return [int(n) for n in num_substeps(taus[:-1] - taus[1:], total_substeps)]


def sample_training_segment(
    batch_size: int, nfe: int, final_step_scale: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw each sample's student segment with probability equal to its raw length (PIFLOW.md §3.1).

    tau ~ U(0, 1] (clamped >= 1e-4); j = clip(ceil(tau / b + 1 - f), 1, nfe); tau_src = (j - 1 + f) * b;
    segment = f * b for j = 1 (the last segment, ending at 0), else b.
    Returns (tau_src (B,), segment (B,)), float64 on the generator's device (CPU without a generator).
    """
    f = final_step_scale
    b = base_step(nfe, f)
    device = generator.device if generator is not None else torch.device("cpu")
    # 1 - U[0, 1) lies in (0, 1], the interval the reference samples from.
    tau = (1.0 - torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)).clamp(min=MIN_TAU)
    j = torch.ceil(tau / b + 1.0 - f).clamp(1, nfe)  # (B,) float64 holding integers
    tau_src = ((j - 1.0 + f) * b).clamp(MIN_TAU, 1.0)
    segment = torch.where(j == 1, torch.full_like(tau, f * b), torch.full_like(tau, b))
    return tau_src, segment


def sample_segment_of(seed: int, index: int, nfe: int, final_step_scale: float) -> tuple[float, float]:
    """(tau_src, segment) of global training sample `index` (§3.1), from its own generator seeded by
    (seed, index): the same sample gets the same segment with any number of ranks, any batch layout and after
    a resume. The key is hashed: torch's CPU generator keeps only the low 32 bits of a seed, so (seed, index)
    packed into one integer would ignore the seed, and the segment stream must differ from the noise stream."""
    key = hashlib.blake2b(f"segment:{seed}:{index}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(key, "little"))
    tau_src, segment = sample_training_segment(1, nfe, final_step_scale, generator=g)
    return float(tau_src[0]), float(segment[0])


def as_batch(value, batch_size: int, device: torch.device | str) -> torch.Tensor:
    """A float or (B,) / 0-d tensor of times -> float64 (B,) tensor on `device`."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device)
    if t.dim() == 0:
        return t.expand(batch_size).clone()
    t = t.reshape(-1)
    if t.numel() != batch_size:
        raise ValueError(f"expected a scalar or {batch_size} per-sample values, got shape {tuple(t.shape)}")
    return t


def base_step(nfe: int, final_step_scale: float) -> float:
    """Base raw step b = 1 / (nfe - 1 + f), validated."""
    if nfe < 1 or not final_step_scale > 0 or not math.isfinite(final_step_scale):
        raise ValueError(f"need nfe >= 1 and final_step_scale > 0, got nfe={nfe}, f={final_step_scale}")
    return 1.0 / (nfe - 1 + final_step_scale)
