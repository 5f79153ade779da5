"""GMPolicy against float64 references (PIFLOW.md §8 properties 1, 2, 6, 7, 8, 9, 16).

References written independently of models/policies/gm.py (which uses the precision form of §2.4):
- the Gaussian-product form of §2.4;
- ordinary Bayes through the implied data GM of property 6;
- brute-force Bayes on a 1-D grid (C = 1).
"""
import math

import pytest
import torch

from models.policies import GMPolicy
from models.rollout import rollout, window_average_velocity
from models.timesteps import unwarp

F64 = torch.float64


def random_gm(B=3, K=5, C=4, H=2, W=3, seed=0, u_std=0.3, sigma_src=None, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(B, K, C, H, W, generator=g, dtype=F64)
    logweights = torch.randn(B, K, 1, H, W, generator=g, dtype=F64)
    logstd = torch.full((B, 1, 1, 1, 1), math.log(u_std), dtype=F64) + 0.1 * torch.randn(B, 1, 1, 1, 1, generator=g, dtype=F64)
    x_src = torch.randn(B, C, H, W, generator=g, dtype=F64)
    if sigma_src is None:
        sigma_src = torch.linspace(0.95, 0.35, B, dtype=F64)  # a different sigma per sample
    return dict(means=means.to(dtype), logweights=logweights.to(dtype), logstd=logstd.to(dtype),
                x_src=x_src.to(dtype), sigma_src=torch.as_tensor(sigma_src, dtype=F64).to(dtype))


def x0_space(p):
    """(mu (B,K,C,H,W), w (B,K,1,H,W), v (B,1,1,1,1)) by §2.3, float64."""
    B = p["x_src"].shape[0]
    s = p["sigma_src"].to(F64).reshape(B, 1, 1, 1, 1)
    mu = p["x_src"].to(F64).unsqueeze(1) - s * p["means"].to(F64)
    w = torch.softmax(p["logweights"].to(F64), dim=1)
    v = torch.exp(2 * p["logstd"].to(F64)).reshape(B, 1, 1, 1, 1) * s**2
    return mu, w, v


def ref_gaussian_product(p, x_t, sigma_t):
    """x0 posterior mean via the Gaussian-product form of §2.4 (float64)."""
    mu, w, v = x0_space(p)
    B = mu.shape[0]
    s_s = p["sigma_src"].to(F64).reshape(B, 1, 1, 1, 1)
    s_t = torch.as_tensor(sigma_t, dtype=F64).reshape(B, 1, 1, 1, 1)
    a_s, a_t = 1 - s_s, 1 - s_t
    Z = a_t**2 * s_s**2 - a_s**2 * s_t**2
    g_var = s_t**2 * s_s**2 / Z
    g_mean = (a_t * s_s**2 * x_t.to(F64).unsqueeze(1) - a_s * s_t**2 * p["x_src"].to(F64).unsqueeze(1)) / Z
    mu_post = (g_var * mu + v * g_mean) / (g_var + v)
    logits = torch.log(w) - ((mu - g_mean) ** 2).sum(2, keepdim=True) / (2 * (g_var + v))
    return (torch.softmax(logits, dim=1) * mu_post).sum(1)


def implied_data_gm(p):
    """Property 6: the data GM whose posterior at (x_src, sigma_src) is the predicted GM (float64)."""
    mu, w, v = x0_space(p)
    B = mu.shape[0]
    s_s = p["sigma_src"].to(F64).reshape(B, 1, 1, 1, 1)
    a_s = 1 - s_s
    inv_v_hat = 1 / v - a_s**2 / s_s**2
    assert torch.all(inv_v_hat > 0), "implied GM must be proper for this test"
    v_hat = 1 / inv_v_hat
    mu_hat = v_hat * (mu / v - a_s * p["x_src"].to(F64).unsqueeze(1) / s_s**2)
    logw_hat = torch.log(w) + ((mu_hat**2) / (2 * v_hat) - (mu**2) / (2 * v)).sum(2, keepdim=True)
    return mu_hat, torch.log_softmax(logw_hat, dim=1), v_hat


def bayes_posterior_mean(mu_hat, logw_hat, v_hat, x_t, sigma_t):
    """Ordinary Bayes for data ~ sum_k pi_k N(mu_hat_k, v_hat I), observation x_t = alpha x0 + sigma eps."""
    B = mu_hat.shape[0]
    s = torch.as_tensor(sigma_t, dtype=F64).reshape(B, 1, 1, 1, 1)
    a = 1 - s
    var_x = a**2 * v_hat + s**2
    x = x_t.to(F64).unsqueeze(1)
    loglik = logw_hat - ((x - a * mu_hat) ** 2).sum(2, keepdim=True) / (2 * var_x)  # shared var: constants cancel
    resp = torch.softmax(loglik, dim=1)
    comp_mean = mu_hat + (a * v_hat / var_x) * (x - a * mu_hat)
    return (resp * comp_mean).sum(1)


def velocity_from_x0(x_t, x0, sigma_t):
    B = x_t.shape[0]
    return (x_t.to(F64) - x0) / torch.as_tensor(sigma_t, dtype=F64).reshape(B, 1, 1, 1)


def query(p, seed=1, frac=None):
    g = torch.Generator().manual_seed(seed)
    B = p["x_src"].shape[0]
    if frac is None:
        frac = torch.tensor([0.9, 0.5, 0.2, 0.7, 0.05, 0.6])[:B].to(F64)
    sigma_t = p["sigma_src"].to(F64) * frac  # sigma_t <= sigma_src, different per sample
    x_t = torch.randn(p["x_src"].shape, generator=g, dtype=F64)
    return x_t, sigma_t


def test_property_01_velocity_at_source_is_mixture_mean():
    p = random_gm()
    policy = GMPolicy(**p)
    expected = (torch.softmax(p["logweights"], 1) * p["means"]).sum(1)
    assert torch.allclose(policy.mean_velocity(), expected, atol=1e-14, rtol=0)
    assert torch.allclose(policy.velocity(p["x_src"], p["sigma_src"]), expected, atol=1e-12, rtol=0)
    # continuity: the general formula just below sigma_src gives the same value
    near = policy.velocity(p["x_src"], p["sigma_src"] * (1 - 1e-7))
    assert (near - expected).abs().max() < 1e-5
    assert (near - expected).abs().max() > 0  # really the general branch, not a copy


def test_property_02_precision_form_matches_product_form_and_bayes():
    p = random_gm(K=5, C=4)
    policy = GMPolicy(**p)
    x_t, sigma_t = query(p)
    got = policy.x0_posterior_mean(x_t, sigma_t)
    ref_prod = ref_gaussian_product(p, x_t, sigma_t)
    ref_bayes = bayes_posterior_mean(*implied_data_gm(p), x_t, sigma_t)
    assert (got - ref_prod).abs().max() < 1e-12
    assert (got - ref_bayes).abs().max() < 1e-12
    assert torch.allclose(policy.velocity(x_t, sigma_t), velocity_from_x0(x_t, ref_prod, sigma_t),
                          atol=1e-11, rtol=0)


def test_property_02_brute_force_bayes_on_grid():
    # C = 1: integrate q(x0 | x_src) * N(x_t; a_t x0, s_t^2) / N(x_src; a_s x0, s_s^2) over a fine x0 grid.
    p = random_gm(B=2, K=5, C=1, H=2, W=2, seed=3)
    policy = GMPolicy(**p)
    x_t, sigma_t = query(p, seed=4)
    got = policy.x0_posterior_mean(x_t, sigma_t)
    mu, w, v = x0_space(p)
    grid = torch.linspace(-12, 12, 240_001, dtype=F64)
    for b in range(2):
        s_s, s_t = p["sigma_src"][b], sigma_t[b]
        for h in range(2):
            for ww in range(2):
                m_k = mu[b, :, 0, h, ww]
                lw_k = torch.log(w[b, :, 0, h, ww])
                log_q = torch.logsumexp(lw_k[:, None] - (grid[None] - m_k[:, None]) ** 2 / (2 * v[b, 0, 0, 0, 0]), 0)
                xs, xt = p["x_src"][b, 0, h, ww], x_t[b, 0, h, ww]
                log_ratio = -((xt - (1 - s_t) * grid) ** 2) / (2 * s_t**2) + ((xs - (1 - s_s) * grid) ** 2) / (2 * s_s**2)
                logp = log_q + log_ratio
                wts = torch.exp(logp - logp.max())
                ref = (wts * grid).sum() / wts.sum()
                assert abs(got[b, 0, h, ww] - ref) < 1e-9


def test_property_06_implied_distribution_consistency():
    p = random_gm(K=4, C=3, seed=5)
    mu_hat, logw_hat, v_hat = implied_data_gm(p)
    # (a) Bayes on the implied data GM at (x_src, sigma_src) gives back the predicted GM itself.
    B = mu_hat.shape[0]
    s = p["sigma_src"].reshape(B, 1, 1, 1, 1)
    a = 1 - s
    x = p["x_src"].unsqueeze(1)
    var_x = a**2 * v_hat + s**2
    resp = torch.log_softmax(logw_hat - ((x - a * mu_hat) ** 2).sum(2, keepdim=True) / (2 * var_x), 1)
    post_mean = mu_hat + (a * v_hat / var_x) * (x - a * mu_hat)
    post_var = v_hat * s**2 / var_x
    mu, w, v = x0_space(p)
    assert torch.allclose(post_mean, mu, atol=1e-12, rtol=0)
    assert torch.allclose(post_var, v, atol=1e-14, rtol=1e-12)
    assert torch.allclose(resp, torch.log(w), atol=1e-10, rtol=0)
    # (b) posterior means from the implied GM match the policy for many (x_t, sigma_t <= sigma_src).
    policy = GMPolicy(**p)
    for seed in range(3):
        x_t, sigma_t = query(p, seed=10 + seed, frac=torch.rand(B, generator=torch.Generator().manual_seed(seed), dtype=F64))
        assert (policy.x0_posterior_mean(x_t, sigma_t) - bayes_posterior_mean(mu_hat, logw_hat, v_hat, x_t, sigma_t)).abs().max() < 1e-11


def test_property_07_affine_for_one_component_only():
    p1 = random_gm(K=1, seed=6)
    policy = GMPolicy(**p1)
    x1, sigma_t = query(p1, seed=7)
    x2, _ = query(p1, seed=8)
    a = 0.3
    lhs = policy.velocity(a * x1 + (1 - a) * x2, sigma_t)
    rhs = a * policy.velocity(x1, sigma_t) + (1 - a) * policy.velocity(x2, sigma_t)
    assert (lhs - rhs).abs().max() < 1e-11
    # closed form pi = (x_t - (mu + v nu) / (1 + v zeta)) / sigma_t
    mu, _, v = x0_space(p1)
    B = mu.shape[0]
    s_s = p1["sigma_src"].reshape(B, 1, 1, 1)
    s_t = sigma_t.reshape(B, 1, 1, 1)
    zeta = ((1 - s_t) / s_t) ** 2 - ((1 - s_s) / s_s) ** 2
    nu = (1 - s_t) * x1 / s_t**2 - (1 - s_s) * p1["x_src"] / s_s**2
    vv = v.reshape(B, 1, 1, 1)
    closed = (x1 - (mu[:, 0] + vv * nu) / (1 + vv * zeta)) / s_t
    assert (policy.velocity(x1, sigma_t) - closed).abs().max() < 1e-11

    pk = random_gm(K=4, seed=6)
    policy_k = GMPolicy(**pk)
    lhs = policy_k.velocity(a * x1 + (1 - a) * x2, sigma_t)
    rhs = a * policy_k.velocity(x1, sigma_t) + (1 - a) * policy_k.velocity(x2, sigma_t)
    assert (lhs - rhs).abs().max() > 1e-3


def test_property_08_temperature():
    p = random_gm(K=4, seed=9)
    policy = GMPolicy(**p)
    x_t, sigma_t = query(p, seed=2, frac=torch.tensor([0.9, 0.8, 0.85], dtype=F64))
    base = policy.velocity(x_t, sigma_t)
    for T in (1.0, 1.7):
        assert torch.equal(policy.with_temperature(T).velocity(x_t, sigma_t), base)
    # T < 1 acts on the x0-space GM: weights softmax(l / T), variance v T, means unchanged.
    T = 0.4
    hot = policy.with_temperature(T)
    mu, w, v = x0_space(p)
    mu_T, logw_T, v_T = hot.x0_gm()
    assert torch.allclose(mu_T, mu, atol=1e-14, rtol=0)
    assert torch.allclose(logw_T, torch.log_softmax(torch.log(w) / T, 1), atol=1e-12, rtol=0)
    assert torch.allclose(v_T, v * T, atol=0, rtol=1e-12)
    pT = dict(p, logweights=torch.log(w) / T, logstd=p["logstd"] + 0.5 * math.log(T))
    ref = velocity_from_x0(x_t, ref_gaussian_product(pT, x_t, sigma_t), sigma_t)
    assert (hot.velocity(x_t, sigma_t) - ref).abs().max() < 1e-10
    # T -> 0: winner-take-all on the largest prior weight, deterministic x0 = mu of that component.
    cold = policy.with_temperature(1e-8)  # error is O(v T)
    k_star = p["logweights"].argmax(1, keepdim=True)  # (B, 1, 1, H, W)
    mu_star = torch.gather(mu, 1, k_star.expand(-1, -1, mu.shape[2], -1, -1))[:, 0]
    assert (cold.velocity(x_t, sigma_t) - velocity_from_x0(x_t, mu_star, sigma_t)).abs().max() < 1e-6
    with pytest.raises(ValueError, match="T must be > 0"):
        policy.with_temperature(0.0)


def test_property_09_dropout():
    B, K = 4000, 4
    g = torch.Generator().manual_seed(0)
    p = dict(means=torch.randn(B, K, 1, 1, 2, generator=g, dtype=F64),
             logweights=torch.randn(B, K, 1, 1, 2, generator=g, dtype=F64),
             logstd=torch.zeros(B, 1, 1, 1, 1, dtype=F64), x_src=torch.randn(B, 1, 1, 2, generator=g, dtype=F64),
             sigma_src=torch.full((B,), 0.8, dtype=F64))
    policy = GMPolicy(**p)
    p_drop = 0.5
    dropped = policy.with_dropout(p_drop, torch.Generator().manual_seed(1))
    lw = dropped.logweights  # (B, K, 1, 1, 2)
    is_dropped = torch.isneginf(lw)
    # the same components are dropped at every pixel of a sample
    assert torch.equal(is_dropped[..., 0], is_dropped[..., 1])
    mask = is_dropped[:, :, 0, 0, 0]  # (B, K)
    n_drop = mask.sum(1)
    assert int(n_drop.max()) < K  # never all components
    # frequency: P(drop) = p except that all-dropped samples (p^K) keep everything
    expected = p_drop - p_drop**K
    assert abs(mask.double().mean().item() - expected) < 0.02
    assert (n_drop == 0).double().mean().item() == pytest.approx((1 - p_drop) ** K + p_drop**K, abs=0.02)
    # kept components: softmax of the remaining original log-weights
    orig = torch.log_softmax(p["logweights"], 1).masked_fill(is_dropped, float("-inf"))
    assert torch.allclose(lw.exp(), torch.softmax(orig, 1), atol=1e-14, rtol=0)
    assert torch.allclose(lw.exp().sum(1), torch.ones(B, 1, 1, 2, dtype=F64), atol=1e-14, rtol=0)
    # velocities stay finite; p = 0 is the identity; the original policy is untouched
    x_t = p["x_src"] * 0.5
    assert torch.isfinite(dropped.velocity(x_t, torch.full((B,), 0.4, dtype=F64))).all()
    assert policy.with_dropout(0.0) is policy
    assert not torch.isneginf(policy.logweights).any()
    # K = 1 can never be dropped
    p1 = random_gm(K=1)
    one = GMPolicy(**p1).with_dropout(0.9, torch.Generator().manual_seed(2))
    assert not torch.isneginf(one.logweights).any()


def test_property_16_batch_independence_per_sample_sigmas():
    B = 4
    p = random_gm(B=B, K=3, C=2, seed=11, sigma_src=torch.tensor([0.97, 0.3, 0.7, 0.5], dtype=F64))
    policy = GMPolicy(**p)
    x_t, sigma_t = query(p, seed=12, frac=torch.tensor([0.5, 0.9, 0.1, 0.99], dtype=F64))
    batched = policy.velocity(x_t, sigma_t)
    shift = 3.2
    tau_src = unwarp(p["sigma_src"], shift)
    tau_end = tau_src * torch.tensor([0.0, 0.6, 0.3, 0.9], dtype=F64)
    rolled = rollout(policy, p["x_src"], tau_src, tau_end, shift)
    tau_w = tau_src - torch.tensor([0.02, 0.001, 0.05, 0.0], dtype=F64)
    win = window_average_velocity(policy, x_t, unwarp(sigma_t, shift), tau_w.clamp(max=unwarp(sigma_t, shift)).clamp(min=0), shift)
    for b in range(B):
        pb = {k: v[b:b + 1] for k, v in p.items()}
        pol_b = GMPolicy(**pb)
        assert (pol_b.velocity(x_t[b:b + 1], sigma_t[b:b + 1]) - batched[b:b + 1]).abs().max() < 1e-13
        assert (rollout(pol_b, pb["x_src"], tau_src[b:b + 1], tau_end[b:b + 1], shift) - rolled[b:b + 1]).abs().max() < 1e-12
        tw = tau_w[b:b + 1].clamp(max=unwarp(sigma_t[b:b + 1], shift)).clamp(min=0)
        single = window_average_velocity(pol_b, x_t[b:b + 1], unwarp(sigma_t[b:b + 1], shift), tw, shift)
        assert (single - win[b:b + 1]).abs().max() < 1e-12
        # and each sample against the independent reference
        ref = velocity_from_x0(x_t[b:b + 1], ref_gaussian_product(pb, x_t[b:b + 1], sigma_t[b:b + 1]), sigma_t[b:b + 1])
        assert (batched[b:b + 1] - ref).abs().max() < 1e-11


def test_float32_math_whatever_the_input_dtype():
    p64 = random_gm(K=3, seed=13)
    x_t, sigma_t = query(p64, seed=14)
    ref = velocity_from_x0(x_t, ref_gaussian_product(p64, x_t, sigma_t), sigma_t)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        p = {k: (v.to(dtype) if k != "sigma_src" else v) for k, v in p64.items()}
        policy = GMPolicy(**p)
        assert policy.means.dtype == torch.float32 and policy.mu.dtype == torch.float32
        u = policy.velocity(x_t.to(dtype), sigma_t.float())
        assert u.dtype == torch.float32
        if dtype == torch.float32:
            assert (u.double() - ref).abs().max() < 1e-4
    # logweights need not be normalised on input
    shifted = GMPolicy(**dict(p64, logweights=p64["logweights"] + 5.0))
    assert torch.allclose(shifted.velocity(x_t, sigma_t), ref, atol=1e-11, rtol=0)


def test_bad_shapes_raise_clear_errors():
    p = random_gm()
    with pytest.raises(ValueError, match="logweights must be"):
        GMPolicy(**dict(p, logweights=p["logweights"][:, :, :, :1]))
    with pytest.raises(ValueError, match="x_src must be"):
        GMPolicy(**dict(p, x_src=p["x_src"][:1]))
