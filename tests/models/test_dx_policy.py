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


# ------------------------------------------------------------------------------------------ polynomial mode
def _compose(coeffs_in_tau, tau_src, length):
    """Coefficients of p(tau) = sum_j a_j tau^j re-expressed in s = (tau_src - tau) / length (float64 numpy)."""
    from numpy.polynomial import Polynomial

    p = Polynomial(coeffs_in_tau)
    return p(Polynomial([tau_src, -length])).coef


def test_polynomial_x0_is_exact_for_a_polynomial_of_its_degree_and_held_below_the_segment():
    # x0(tau) = sum_j a_j (tau_src - tau)^j with raw-time coefficients a_j (the reference's basis): our
    # normalised coefficients are c_j = a_j len^j and must reproduce it exactly anywhere on the segment.
    g = torch.Generator().manual_seed(3)
    B, P = 3, 6
    a = torch.randn(B, P, 2, 2, 3, generator=g, dtype=F64)
    x_src = torch.randn(B, 2, 2, 3, generator=g, dtype=F64)
    sigma_src = torch.tensor([1.0, 0.8, 0.3], dtype=F64)
    segment = torch.tensor([2 / 7, 1 / 7, 0.5], dtype=F64)  # the last one is clipped at tau = 0
    tau_src = unwarp(sigma_src, SHIFT)
    length = tau_src - (tau_src - segment).clamp(min=0)
    c = a * length.reshape(B, 1, 1, 1, 1) ** torch.arange(P, dtype=F64).reshape(1, P, 1, 1, 1)
    policy = DXPolicy(c, x_src, sigma_src, segment, SHIFT, mode="polynomial")
    for frac in (0.0, 0.1, 0.37, 0.5, 0.93, 1.0):
        tau = tau_src - frac * length
        d = (tau_src - tau).reshape(B, 1, 1, 1, 1) ** torch.arange(P, dtype=F64).reshape(1, P, 1, 1, 1)
        expected = (a * d).sum(dim=1)
        assert (policy.x0(warp(tau, SHIFT)) - expected).abs().max() < 1e-12
    assert torch.equal(policy.x0(sigma_src), c[:, 0])  # at tau_src: the constant coefficient
    end = c.sum(dim=1)  # s = 1 at the segment's end, held below it (like the grid's point 0)
    below = warp((tau_src - length) * 0.5, SHIFT)
    assert (policy.x0(below) - end).abs().max() < 1e-12
    # velocity = (x_t - x0) / sigma_t in this mode too
    x_t = torch.randn_like(x_src)
    s = warp(tau_src - 0.4 * length, SHIFT)
    assert (policy.velocity(x_t, s) - (x_t - policy.x0(s)) / s.reshape(B, 1, 1, 1)).abs().max() < 1e-14


def test_polynomial_policy_is_the_exact_velocity_of_a_polynomial_trajectory():
    # Shift 1 (sigma = tau). Along x(sigma) = sum_j b_j sigma^j (degree P - 1) the DX field (x - x0) / sigma
    # equals dx/dsigma iff x0(sigma) = x - sigma x' = sum_j (1 - j) b_j sigma^j, a polynomial of the same degree:
    # the polynomial mode with P coefficients holds it exactly, the grid with P points does not.
    g = torch.Generator().manual_seed(4)
    P, shift, sigma_src, seg = 5, 1.0, 0.9, 0.6
    b = torch.randn(P, 2, generator=g, dtype=F64)  # (P, C) with C = 2, one pixel
    j = torch.arange(P, dtype=F64)
    x_of = lambda s: (b * s ** j[:, None]).sum(0)  # noqa: E731
    dx_of = lambda s: (b[1:] * j[1:, None] * s ** (j[1:, None] - 1)).sum(0)  # noqa: E731
    x0_in_sigma = ((1 - j)[:, None] * b).numpy()  # (P, C): coefficients of x0 in sigma = tau
    c = torch.stack([torch.from_numpy(_compose(x0_in_sigma[:, ch], sigma_src, seg)) for ch in range(2)], dim=1)
    c = c.reshape(1, P, 2, 1, 1)
    x_src = x_of(torch.tensor(sigma_src, dtype=F64)).reshape(1, 2, 1, 1)
    poly = DXPolicy(c, x_src, torch.tensor([sigma_src], dtype=F64), seg, shift, mode="polynomial")
    for s in torch.linspace(sigma_src, sigma_src - seg, 9, dtype=F64):
        u = poly.velocity(x_of(s).reshape(1, 2, 1, 1), s)
        assert (u.reshape(2) - dx_of(s)).abs().max() < 1e-10
    # the same trajectory sampled on a P-point grid is only piecewise linear: a visible error between nodes
    nodes = torch.linspace(sigma_src - seg, sigma_src, P, dtype=F64)
    grid = torch.stack([poly.x0(n) for n in nodes], dim=1)  # (1, P, 2, 1, 1) exact at the nodes
    grid_policy = DXPolicy(grid, x_src, torch.tensor([sigma_src], dtype=F64), seg, shift)
    s = 0.5 * (nodes[2] + nodes[3])  # midway between two grid nodes
    u_grid = grid_policy.velocity(x_of(s).reshape(1, 2, 1, 1), s)
    assert (u_grid.reshape(2) - dx_of(s)).abs().max() > 1e-3
    # and the Euler rollout of the polynomial policy converges to the trajectory's end at first order
    from models.rollout import rollout

    tau_end = sigma_src - seg
    errs = [float((rollout(poly, x_src, sigma_src, tau_end, shift, n) - x_of(torch.tensor(tau_end, dtype=F64))
                   .reshape(1, 2, 1, 1)).abs().max()) for n in (32, 128, 512)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.3 * errs[1] and errs[2] < 5e-3


def test_polynomial_batch_independence_and_detach_keep_the_mode():
    g = torch.Generator().manual_seed(5)
    c = torch.randn(3, 4, 2, 1, 2, generator=g, dtype=F64)
    x_src = torch.randn(3, 2, 1, 2, generator=g, dtype=F64)
    sigma_src = torch.tensor([0.9, 0.4, 0.7], dtype=F64)
    segment = torch.tensor([2 / 7, 1 / 7, 0.05], dtype=F64)
    policy = DXPolicy(c, x_src, sigma_src, segment, SHIFT, mode="polynomial")
    sigma_t = sigma_src * torch.tensor([0.6, 0.95, 0.8], dtype=F64)
    x_t = torch.randn_like(x_src)
    batched = policy.velocity(x_t, sigma_t)
    for b in range(3):
        sl = slice(b, b + 1)
        single = DXPolicy(c[sl], x_src[sl], sigma_src[sl], float(segment[b]), SHIFT, mode="polynomial")
        assert torch.equal(single.velocity(x_t[sl], sigma_t[sl]), batched[sl])
    assert policy.detach().mode == "polynomial"
    assert torch.equal(policy.detach().velocity(x_t, sigma_t), batched)
    with pytest.raises(ValueError, match="mode must be one of"):
        DXPolicy(c, x_src, sigma_src, segment, SHIFT, mode="spline")


def test_u_to_x0_conversion_per_mode():
    from models.policies import dx_x0_from_u

    g = torch.Generator().manual_seed(6)
    u = torch.randn(2, 4, 2, 1, 1, generator=g, dtype=F64)
    x_src = torch.randn(2, 2, 1, 1, generator=g, dtype=F64)
    sigma = torch.tensor([0.7, 0.2], dtype=F64)
    grid = dx_x0_from_u(u, x_src, sigma, "grid")
    assert torch.equal(grid, x_src[:, None] - sigma.reshape(2, 1, 1, 1, 1) * u)
    poly = dx_x0_from_u(u, x_src, sigma, "polynomial")
    assert torch.equal(poly[:, 0], grid[:, 0])  # the constant term is an x0 prediction
    assert torch.equal(poly[:, 1:], -sigma.reshape(2, 1, 1, 1, 1) * u[:, 1:])  # the others are x0 differences
    # zero higher outputs (the head's init): x0 is the constant term's prediction over the whole segment
    u0 = torch.cat([u[:, :1], torch.zeros_like(u[:, 1:])], dim=1)
    policy = DXPolicy(dx_x0_from_u(u0, x_src, sigma, "polynomial"), x_src, sigma, 0.25, SHIFT, mode="polynomial")
    for f in (1.0, 0.8, 0.3):
        assert (policy.x0(sigma * f) - grid[:, 0]).abs().max() < 1e-14
