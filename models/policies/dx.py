"""The DX policy pi-DX: N x0 predictions over the segment, turned into a velocity field (§2.7).

Two ways to spread the N predictions over the segment [tau_end, tau_src] (raw time):
- grid: N x0 values on a uniform grid, linearly interpolated in raw time (index 0 = end of the segment, N - 1 =
  its start tau_src);
- polynomial: N coefficients of a polynomial of degree N - 1 in s = (tau_src - tau) / len in [0, 1],
  x0(tau) = sum_i s^i c_i, so c_0 is the x0 prediction at tau_src.
The segment size and shift are intrinsic to a trained DX student (keep them fixed at inference). DX has no
temperature and ignores component dropout.

Why the normalised s (the reference uses the raw distance tau_src - tau): both span the same polynomials on the
segment, but with raw times coefficient i is scaled by len^i (0.25^9 = 4e-6 for N = 10 on a 4-step segment), so
the head would have to output the high-order terms 10^5 times larger than the constant one.
"""
from __future__ import annotations

import torch

from models.policies.gm import compute_dtype, sigma_batch
from models.timesteps import unwarp

MODES = ("grid", "polynomial")


def dx_x0_from_u(u: torch.Tensor, x_src: torch.Tensor, sigma_src: torch.Tensor, mode: str = "grid") -> torch.Tensor:
    """The DX head's u-space outputs (B, N, C, H, W) -> the policy's x0-space values (B, N, C, H, W).

    grid: every point x0_i = x_src - sigma_src * u_i (each is an x0 prediction, §2.7).
    polynomial: c_0 = x_src - sigma_src * u_0 and c_i = -sigma_src * u_i for i >= 1 (the higher coefficients
    are differences of x0, so x_src does not enter them; a zero-initialised head then starts from the teacher's
    x0 held constant over the segment, like the grid).
    """
    if mode not in MODES:
        raise ValueError(f"DX mode must be one of {MODES}, got {mode!r}")
    B = u.shape[0]
    scale = sigma_src.reshape(B, 1, 1, 1, 1).to(u.dtype)
    x0 = -scale * u  # (B, N, C, H, W)
    if mode == "grid":
        return x0 + x_src.unsqueeze(1).to(u.dtype)
    return torch.cat([x0[:, :1] + x_src.unsqueeze(1).to(u.dtype), x0[:, 1:]], dim=1)


class DXPolicy:
    """pi-DX. x0_grid (B, N, C, H, W) in x0 space (grid values or polynomial coefficients, see `mode`);
    x_src (B, C, H, W); sigma_src (B,); segment: float or (B,) raw-time length; shift: the policy's intrinsic
    shift; eps clamps the segment length and sigma_t."""

    def __init__(self, x0_grid, x_src, sigma_src, segment, shift: float, eps: float = 1e-4, mode: str = "grid"):
        if x0_grid.dim() != 5:
            raise ValueError(f"DXPolicy: x0_grid must be (B, N, C, H, W), got {tuple(x0_grid.shape)}")
        if mode not in MODES:
            raise ValueError(f"DXPolicy: mode must be one of {MODES}, got {mode!r}")
        B, N, C, H, W = x0_grid.shape
        if tuple(x_src.shape) != (B, C, H, W):
            raise ValueError(f"DXPolicy: x_src must be {(B, C, H, W)}, got {tuple(x_src.shape)}")
        dtype = compute_dtype(x0_grid, x_src)
        self.eps = eps
        self.shift = shift
        self.mode = mode
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
                        self.segment.detach(), self.shift, self.eps, self.mode)

    def with_dropout(self, p: float, generator: torch.Generator | None = None) -> "DXPolicy":
        """DX has no components: dropout does not apply (§2.6)."""
        return self

    def x0(self, sigma_t) -> torch.Tensor:
        """The x0 prediction at sigma_t, (B, C, H, W), from r = clip((tau - tau_end) / len, 0, 1).

        grid: position r * (N - 1), linear between the two neighbouring grid points.
        polynomial: sum_i (1 - r)^i c_i (1 - r = the normalised distance from tau_src; held at the segment's
        end value below tau_end, as the grid is)."""
        B, N = self.x0_grid.shape[:2]
        if N == 1:
            return self.x0_grid[:, 0]
        tau = unwarp(sigma_batch(sigma_t, B, self.dtype, self.x0_grid.device), self.shift)
        r = ((tau - self.tau_end) / self.length).clamp(0, 1)  # (B,)
        if self.mode == "polynomial":
            powers = (1 - r)[:, None] ** torch.arange(N, device=r.device, dtype=r.dtype)  # (B, N)
            return (powers.reshape(B, N, 1, 1, 1) * self.x0_grid).sum(dim=1)
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
