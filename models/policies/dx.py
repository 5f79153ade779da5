"""The DX policy pi-DX: N x0 predictions on a grid over the segment, linearly interpolated in raw time (§2.7).

Grid index 0 is the end of the segment, N - 1 its start tau_src. The segment size and shift are intrinsic to a
trained DX student (keep them fixed at inference). DX has no temperature and ignores component dropout.
"""
from __future__ import annotations

import torch

from models.policies.gm import compute_dtype, sigma_batch
from models.timesteps import unwarp


class DXPolicy:
    """pi-DX. x0_grid (B, N, C, H, W) in x0 space; x_src (B, C, H, W); sigma_src (B,); segment: float or (B,)
    raw-time length; shift: the policy's intrinsic shift; eps clamps the segment length and sigma_t."""

    def __init__(self, x0_grid, x_src, sigma_src, segment, shift: float, eps: float = 1e-4):
        if x0_grid.dim() != 5:
            raise ValueError(f"DXPolicy: x0_grid must be (B, N, C, H, W), got {tuple(x0_grid.shape)}")
        B, N, C, H, W = x0_grid.shape
        if tuple(x_src.shape) != (B, C, H, W):
            raise ValueError(f"DXPolicy: x_src must be {(B, C, H, W)}, got {tuple(x_src.shape)}")
        dtype = compute_dtype(x0_grid, x_src)
        self.eps = eps
        self.shift = shift
        self.x0_grid = x0_grid.to(dtype)  # (B, N, C, H, W)
        self.x_src = x_src.to(dtype)  # (B, C, H, W)
        self.sigma_src = sigma_batch(sigma_src, B, dtype, x0_grid.device)  # (B,)
        self.segment = sigma_batch(segment, B, dtype, x0_grid.device)  # (B,)
        # Time mapping of §2.7, per sample.
        self.tau_src = unwarp(self.sigma_src, shift)  # (B,)
        self.tau_end = (self.tau_src - self.segment).clamp(min=0)  # (B,)
        self.length = (self.tau_src - self.tau_end).clamp(min=eps)  # (B,)

    @property
    def dtype(self) -> torch.dtype:
        return self.x0_grid.dtype

    @property
    def batch_size(self) -> int:
        return self.x0_grid.shape[0]

    def detach(self) -> "DXPolicy":
        return DXPolicy(self.x0_grid.detach(), self.x_src.detach(), self.sigma_src.detach(),
                        self.segment.detach(), self.shift, self.eps)

    def with_dropout(self, p: float, generator: torch.Generator | None = None) -> "DXPolicy":
        """DX has no components: dropout does not apply (§2.6)."""
        return self

    def x0(self, sigma_t) -> torch.Tensor:
        """Interpolated x0 prediction at sigma_t, (B, C, H, W): position r * (N - 1) with
        r = clip((tau - tau_end) / len, 0, 1), linear between the two neighbouring grid points."""
        B, N = self.x0_grid.shape[:2]
        if N == 1:
            return self.x0_grid[:, 0]
        tau = unwarp(sigma_batch(sigma_t, B, self.dtype, self.x0_grid.device), self.shift)
        r = ((tau - self.tau_end) / self.length).clamp(0, 1)
        pos = r * (N - 1)  # (B,)
        lower = pos.floor().clamp(max=N - 2).long()  # (B,), so that lower + 1 is always a grid point
        frac = (pos - lower.to(pos.dtype)).reshape(B, 1, 1, 1)
        batch = torch.arange(B, device=self.x0_grid.device)
        return self.x0_grid[batch, lower] * (1 - frac) + self.x0_grid[batch, lower + 1] * frac

    def velocity(self, x_t: torch.Tensor, sigma_t) -> torch.Tensor:
        """pi(x_t, sigma_t) = (x_t - x0(tau(sigma_t))) / max(sigma_t, eps), (B, C, H, W)."""
        B = self.batch_size
        x_t = x_t.to(self.dtype)
        sigma = sigma_batch(sigma_t, B, self.dtype, x_t.device).clamp(min=self.eps).reshape(B, 1, 1, 1)
        return (x_t - self.x0(sigma_t)) / sigma
