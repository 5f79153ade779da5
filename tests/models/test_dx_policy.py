"""DXPolicy against float64 references (PIFLOW.md §2.7; §8 property 13, plus batch independence)."""
import pytest
import torch

from models.policies import DXPolicy
from models.timesteps import unwarp, warp

F64 = torch.float64
SHIFT = 3.2


def make(B=3, N=5, seed=0, sigma_src=(1.0, 0.8, 0.5), segment=2 / 7):
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(B, N, 2, 2, 3, generator=g, dtype=F64)
    x_src = torch.randn(B, 2, 2, 3, generator=g, dtype=F64)
    return grid, x_src, torch.tensor(sigma_src, dtype=F64), DXPolicy(grid, x_src, torch.tensor(sigma_src, dtype=F64), segment, SHIFT)


def test_property_13_dx_interpolation_endpoints_and_linearity_in_tau():
    grid, x_src, sigma_src, policy = make()
    B, N = grid.shape[:2]
    tau_src = unwarp(sigma_src, SHIFT)
    tau_end = (tau_src - 2 / 7).clamp(min=0)
    # at tau_src: grid point N - 1 exactly
    assert torch.equal(policy.x0(sigma_src), grid[:, N - 1])
    # at and below tau_end: grid point 0
    assert (policy.x0(warp(tau_end, SHIFT)) - grid[:, 0]).abs().max() < 1e-12
    assert torch.equal(policy.x0(warp(tau_end * 0.5, SHIFT)), grid[:, 0])
    # at the grid nodes tau_i = tau_end + i / (N - 1) * len: grid point i; halfway: the average
    length = tau_src - tau_end
    for i in range(N):
        t = tau_end + i / (N - 1) * length
        assert (policy.x0(warp(t, SHIFT)) - grid[:, i]).abs().max() < 1e-12
        if i < N - 1:
            t_mid = tau_end + (i + 0.5) / (N - 1) * length
            assert (policy.x0(warp(t_mid, SHIFT)) - 0.5 * (grid[:, i] + grid[:, i + 1])).abs().max() < 1e-12
    # linear in tau (not sigma): with a grid linear in its index, x0(tau) is exactly linear in tau
    A, D = torch.randn(B, 1, 2, 2, 3, dtype=F64), torch.randn(B, 1, 2, 2, 3, dtype=F64)
    lin = A + D * torch.arange(N, dtype=F64).reshape(1, N, 1, 1, 1)
    lin_policy = DXPolicy(lin, x_src, sigma_src, 2 / 7, SHIFT)
    for frac in (0.13, 0.5, 0.77):
        t = tau_end + frac * length
        expected = A[:, 0] + D[:, 0] * ((N - 1) * frac)
        assert (lin_policy.x0(warp(t, SHIFT)) - expected).abs().max() < 1e-12
    # ... and not linear in sigma (shift 3.2): the sigma-midpoint is not the average of the endpoints
    s_mid = 0.5 * (warp(tau_end, SHIFT) + sigma_src)
    avg = 0.5 * (lin[:, 0] + lin[:, N - 1])
    assert (lin_policy.x0(s_mid) - avg).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    # velocity = (x_t - x0) / sigma_t
    x_t = torch.randn_like(x_src)
    s = warp(tau_end + 0.3 * length, SHIFT)
    assert (policy.velocity(x_t, s) - (x_t - policy.x0(s)) / s.reshape(B, 1, 1, 1)).abs().max() < 1e-14
    # N = 1 returns the single x0 whatever the time
    one = DXPolicy(grid[:, :1], x_src, sigma_src, 2 / 7, SHIFT)
    assert torch.equal(one.x0(s), grid[:, 0])


def test_dx_batch_independence_and_per_sample_segments():
    grid, x_src, sigma_src, _ = make(seed=1, sigma_src=(0.9, 0.4, 0.7))
    segment = torch.tensor([2 / 7, 1 / 7, 0.05], dtype=F64)
    policy = DXPolicy(grid, x_src, sigma_src, segment, SHIFT)
    sigma_t = sigma_src * torch.tensor([0.6, 0.95, 0.8], dtype=F64)
    x_t = torch.randn_like(x_src)
    batched = policy.velocity(x_t, sigma_t)
    for b in range(3):
        sl = slice(b, b + 1)
        single = DXPolicy(grid[sl], x_src[sl], sigma_src[sl], float(segment[b]), SHIFT)
        assert torch.equal(single.velocity(x_t[sl], sigma_t[sl]), batched[sl])


def test_dx_dtype_detach_and_dropout_noop():
    grid, x_src, sigma_src, _ = make(seed=2)
    g32 = grid.to(torch.bfloat16).requires_grad_(True)
    policy = DXPolicy(g32, x_src.to(torch.bfloat16), sigma_src, 2 / 7, SHIFT)
    assert policy.x0_grid.dtype == torch.float32
    u = policy.velocity(x_src.float(), sigma_src.float() * 0.5)
    assert u.dtype == torch.float32 and u.requires_grad
    d = policy.detach()
    assert not d.x0_grid.requires_grad and d.with_dropout(0.5) is d
    with pytest.raises(ValueError, match="x_src must be"):
        DXPolicy(grid, x_src[:1], sigma_src, 2 / 7, SHIFT)
