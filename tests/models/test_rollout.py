"""Rollout and window-averaged velocity (PIFLOW.md §8 properties 3, 5, 14), against float64 references."""
import math

import pytest
import torch

from models.policies import DXPolicy, GMPolicy
from models.rollout import rollout, rollout_to_points, window_average_velocity
from models.timesteps import unwarp, warp

F64 = torch.float64


def ddim_gm(m, x_src, sigma_src):
    """K = 1, v = 0 (logstd -> -inf in float64): the DX/x0 policy with one grid point (property 3)."""
    B = x_src.shape[0]
    return GMPolicy(m.unsqueeze(1), torch.zeros(B, 1, 1, *x_src.shape[2:], dtype=F64),
                    torch.full((B, 1, 1, 1, 1), -400.0, dtype=F64), x_src, sigma_src)


def euler_reference(velocity, x, tau_start: float, tau_end: float, n: int, shift: float):
    """Plain float64 Euler on a uniform tau grid with n substeps, one sample at a time."""
    taus = [tau_start + (tau_end - tau_start) * i / n for i in range(n + 1)]
    for t0, t1 in zip(taus[:-1], taus[1:]):
        s0, s1 = warp(t0, shift), warp(t1, shift)
        x = x + velocity(x, s0) * (s1 - s0)
    return x


def small_gm(B=3, K=3, seed=0, sigma_src=(0.9, 0.6, 0.4)):
    g = torch.Generator().manual_seed(seed)
    return GMPolicy(torch.randn(B, K, 2, 2, 2, generator=g, dtype=F64), torch.randn(B, K, 1, 2, 2, generator=g, dtype=F64),
                    torch.full((B, 1, 1, 1, 1), math.log(0.3), dtype=F64), torch.randn(B, 2, 2, 2, generator=g, dtype=F64),
                    torch.tensor(sigma_src, dtype=F64))


def test_property_03_ddim_policy_rollout_is_exact():
    g = torch.Generator().manual_seed(0)
    B = 3
    x_src = torch.randn(B, 4, 2, 2, generator=g, dtype=F64)
    m = torch.randn(B, 4, 2, 2, generator=g, dtype=F64)
    sigma_src = torch.tensor([0.95, 0.7, 0.4], dtype=F64)
    mu = x_src - sigma_src.reshape(B, 1, 1, 1) * m
    gm = ddim_gm(m, x_src, sigma_src)
    x_t = torch.randn(B, 4, 2, 2, generator=g, dtype=F64)
    sigma_t = sigma_src * 0.3
    # x0_hat = mu everywhere, pi = (x_t - mu) / sigma_t
    assert (gm.x0_posterior_mean(x_t, sigma_t) - mu).abs().max() < 1e-13
    for shift in (1.0, 3.2):
        tau_src = unwarp(sigma_src, shift)
        for frac in (0.0, 0.5):
            tau_end = tau_src * frac
            sigma_end = warp(tau_end, shift).reshape(B, 1, 1, 1)
            exact = x_src + m * (sigma_end - sigma_src.reshape(B, 1, 1, 1))
            # the whole batch at the default 128 substeps per unit tau (per-sample counts differ)
            assert (rollout(gm, x_src, tau_src, tau_end, shift) - exact).abs().max() < 1e-13
            for b in range(B):
                sl = slice(b, b + 1)
                gm_b = ddim_gm(m[sl], x_src[sl], sigma_src[sl])
                dx_b = DXPolicy(mu[sl].unsqueeze(1), x_src[sl], sigma_src[sl], segment=0.3, shift=shift)
                for n in ((1, 3, 128) if b == 0 else (1, 3)):
                    total = n / float(tau_src[b] - tau_end[b])  # exactly n substeps
                    assert (rollout(gm_b, x_src[sl], tau_src[sl], tau_end[sl], shift, total) - exact[sl]).abs().max() < 1e-13
                    assert (rollout(dx_b, x_src[sl], tau_src[sl], tau_end[sl], shift, total) - exact[sl]).abs().max() < 1e-13


def test_property_05_rollout_converges_to_gaussian_flow_map():
    # Data N(mu_d, s_d^2 I); exact K = 1 posterior GM at (x_src, sigma_src = 0.9); shift 3.2; roll to sigma = 0.
    g = torch.Generator().manual_seed(1)
    C, H, W = 2, 4, 4
    mu_d = torch.randn(1, C, H, W, generator=g, dtype=F64)
    s_d = 0.5
    sigma_src, shift = 0.9, 3.2
    a_s = 1 - sigma_src
    x_src = a_s * mu_d + math.sqrt(a_s**2 * s_d**2 + sigma_src**2) * torch.randn(1, C, H, W, generator=g, dtype=F64)
    prec = 1 / s_d**2 + a_s**2 / sigma_src**2
    post_mean = (mu_d / s_d**2 + a_s * x_src / sigma_src**2) / prec
    post_var = 1 / prec
    m = (x_src - post_mean) / sigma_src
    policy = GMPolicy(m.unsqueeze(1), torch.zeros(1, 1, 1, H, W, dtype=F64),
                      torch.full((1, 1, 1, 1, 1), 0.5 * math.log(post_var / sigma_src**2), dtype=F64), x_src,
                      torch.tensor([sigma_src], dtype=F64))
    z = (x_src - a_s * mu_d) / math.sqrt(a_s**2 * s_d**2 + sigma_src**2)
    exact_end = mu_d + s_d * z  # alpha = 1, sigma = 0
    tau_src = unwarp(sigma_src, shift)
    errors = []
    for n in (8, 32, 128, 512):
        out = rollout(policy, x_src, tau_src, 0.0, shift, total_substeps=n / tau_src)
        errors.append((out - exact_end).abs().max().item())
    # first order: each 4x more substeps cuts the error by about 4x
    for e_coarse, e_fine in zip(errors[:-1], errors[1:]):
        assert 3.0 < e_coarse / e_fine < 5.0
    assert errors[-1] < 1e-2  # 0.005 here (PIFLOW.md quotes 0.0012 at 512 for its own, unstated mu_d, s_d)


def test_rollout_matches_independent_euler_with_per_sample_spans():
    policy = small_gm()
    shift = 3.2
    x = policy.x_src.clone()
    tau_start = unwarp(policy.sigma_src, shift)
    tau_end = tau_start * torch.tensor([0.0, 0.5, 0.3], dtype=F64)  # per-sample substep counts differ
    out = rollout(policy, x, tau_start, tau_end, shift)
    for b in range(3):
        n = max(1, round(float(tau_start[b] - tau_end[b]) * 128))
        pb = GMPolicy(policy.means[b:b + 1], policy.logweights[b:b + 1], policy.logstd[b:b + 1],
                      policy.x_src[b:b + 1], policy.sigma_src[b:b + 1])
        ref = euler_reference(lambda xx, s: pb.velocity(xx, torch.tensor([s], dtype=F64)), x[b:b + 1],
                              float(tau_start[b]), float(tau_end[b]), n, shift)
        assert (out[b:b + 1] - ref).abs().max() < 1e-12


def test_rollout_to_points_equals_successive_rollouts():
    policy = small_gm(seed=2)
    shift = 3.2
    tau0 = unwarp(policy.sigma_src, shift)
    points = torch.stack([tau0 - 0.013, tau0 - 0.1, (tau0 - 0.31).clamp(min=0)])  # (3, B)
    states, u_first = rollout_to_points(policy, policy.x_src, tau0, points, shift)
    x, t = policy.x_src, tau0
    for i in range(3):
        x = rollout(policy, x, t, points[i], shift)
        t = points[i]
        assert (states[i] - x).abs().max() < 1e-12
    assert (u_first - policy.velocity(policy.x_src, policy.sigma_src)).abs().max() < 1e-14
    with pytest.raises(ValueError, match="must be <= the previous one"):
        rollout(policy, policy.x_src, tau0, tau0 + 0.1, shift)


def test_property_14_window_average_limits():
    policy = small_gm(seed=3)
    shift = 3.2
    tau_a = unwarp(policy.sigma_src * 0.8, shift)
    x_a = policy.x_src * 0.7
    local = policy.velocity(x_a, warp(tau_a, shift))
    # round(d_tau * 128) < 2: the local velocity exactly (spans of 0, 1 and 1.4 substeps)
    for d in (0.0, 1.0 / 128, 1.4 / 128):
        out = window_average_velocity(policy, x_a, tau_a, tau_a - d, shift)
        assert torch.equal(out, local)
    # a window of >= 2 substeps: (x_a - x_end) / (sigma_a - sigma_end) with x_end from an independent Euler loop
    d = 3 / 128
    out = window_average_velocity(policy, x_a, tau_a, tau_a - d, shift)
    for b in range(3):
        pb = GMPolicy(policy.means[b:b + 1], policy.logweights[b:b + 1], policy.logstd[b:b + 1],
                      policy.x_src[b:b + 1], policy.sigma_src[b:b + 1])
        x_end = euler_reference(lambda xx, s: pb.velocity(xx, torch.tensor([s], dtype=F64)), x_a[b:b + 1],
                                float(tau_a[b]), float(tau_a[b]) - d, 3, shift)
        ref = (x_a[b:b + 1] - x_end) / (warp(float(tau_a[b]), shift) - warp(float(tau_a[b]) - d, shift))
        assert (out[b:b + 1] - ref).abs().max() < 1e-12
    # window -> 0 on a fine substep grid: the average tends to the local velocity (first order)
    errs = []
    for d in (0.04, 0.01, 0.0025):
        errs.append((window_average_velocity(policy, x_a, tau_a, tau_a - d, shift, total_substeps=4 / d) - local).abs().max().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.05 * max(1.0, local.abs().max().item())
    # mixed batch: per-sample choice between local and windowed
    tau_end = tau_a - torch.tensor([0.0, 3 / 128, 1 / 128], dtype=F64)
    mixed = window_average_velocity(policy, x_a, tau_a, tau_end, shift)
    assert torch.equal(mixed[0], local[0]) and torch.equal(mixed[2], local[2])
    assert (mixed[1] - out[1]).abs().max() < 1e-13
    # K = 1, v = 0: the window average equals the local velocity for any window
    g = torch.Generator().manual_seed(4)
    m = torch.randn(3, 2, 2, 2, generator=g, dtype=F64)
    ddim = ddim_gm(m, policy.x_src, policy.sigma_src)
    loc = ddim.velocity(x_a, warp(tau_a, shift))
    for d in (3 / 128, 0.1, 0.3):
        out = window_average_velocity(ddim, x_a, tau_a, (tau_a - d).clamp(min=0), shift)
        assert (out - loc).abs().max() < 1e-12


def test_gradients_flow_through_window_rollout():
    policy = small_gm(seed=5)
    means = policy.means.clone().requires_grad_(True)
    p = GMPolicy(means, policy.logweights, policy.logstd, policy.x_src, policy.sigma_src)
    shift = 3.2
    tau_a = unwarp(policy.sigma_src * 0.8, shift)
    u = window_average_velocity(p, policy.x_src * 0.7, tau_a, tau_a - 3 / 128, shift)
    u.sum().backward()
    assert means.grad is not None and torch.isfinite(means.grad).all() and means.grad.abs().sum() > 0
