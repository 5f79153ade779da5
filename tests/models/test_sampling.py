"""Few-step sampler and FlowMapSDE step (PIFLOW.md §4.1; §8 property 12; temperature rule of property 8)."""
import math

import pytest
import torch

from models.policies import DXPolicy, GMPolicy
from models.rollout import rollout
from models.sampling import auto_temperature, flow_map_sde_step, flow_map_sigma_dst, sample
from models.timesteps import step_grid

F64 = torch.float64


def ref_m(sigma_src, sigma_to, h):
    return (sigma_to * (1 - sigma_src) / (sigma_src * (1 - sigma_to))) ** (h * h)


def test_auto_temperature():
    assert auto_temperature(1) == 0.0
    assert auto_temperature(4) == pytest.approx(0.3)
    assert auto_temperature(8) == pytest.approx(0.7)
    assert auto_temperature(11) == 1.0 and auto_temperature(30) == 1.0


def test_property_12_flow_map_sde_step():
    g = torch.Generator().manual_seed(0)
    x_dst = torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    sigma_src = torch.tensor([0.9, 0.7, 0.5], dtype=F64)
    sigma_to = torch.tensor([0.7, 0.4, 0.2], dtype=F64)
    # h = 0: identity, sigma_dst = sigma_to
    assert flow_map_sde_step(x_dst, sigma_src, sigma_to, 0.0) is x_dst
    assert torch.allclose(flow_map_sigma_dst(sigma_src, sigma_to, 0.0), sigma_to, atol=1e-16, rtol=0)
    for h in (0.5, 1.0, 2.0, float("inf")):
        m = torch.zeros(3, dtype=F64) if h == float("inf") else ref_m(sigma_src, sigma_to, h)
        sigma_dst = flow_map_sigma_dst(sigma_src, sigma_to, h)
        assert torch.allclose(sigma_dst, sigma_to * m / (1 - sigma_to + sigma_to * m), atol=1e-15, rtol=0)
        alpha_dst = 1 - sigma_dst
        # x_to is affine in x_dst: x_to = a x_dst + c z. Recover a and c z with the same noise seed.
        cz = flow_map_sde_step(torch.zeros_like(x_dst), sigma_src, sigma_to, h, torch.Generator().manual_seed(5))
        x_to = flow_map_sde_step(x_dst, sigma_src, sigma_to, h, torch.Generator().manual_seed(5))
        z = torch.randn(x_dst.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
        a = ((x_to - cz) / x_dst).mean(dim=(1, 2, 3))
        c = (cz / z).mean(dim=(1, 2, 3))
        # x_dst = alpha_dst x0 + sigma_dst eps  =>  x_to = a alpha_dst x0 + a sigma_dst eps + c z
        assert torch.allclose(a * alpha_dst, 1 - sigma_to, atol=1e-14, rtol=0)  # x0 coefficient = alpha_to
        total_var = (a * sigma_dst) ** 2 + c**2
        assert torch.allclose(total_var, sigma_to**2, atol=1e-14, rtol=0)  # noise variance = sigma_to^2
    # last step (sigma_to = 0) leaves the sample alone for any h
    for h in (0.0, 1.0):
        out = flow_map_sde_step(x_dst, sigma_src, torch.zeros(3, dtype=F64), h, torch.Generator().manual_seed(1))
        assert torch.equal(out, x_dst)
        assert torch.all(flow_map_sigma_dst(sigma_src, torch.zeros(3, dtype=F64), h) == 0)
    # empirical check of the marginal: x0 = 0 and eps ~ N(0,1) at sigma_dst gives std sigma_to at sigma_to
    h = 1.0
    s_src, s_to = torch.tensor([0.8], dtype=F64), torch.tensor([0.5], dtype=F64)
    s_dst = flow_map_sigma_dst(s_src, s_to, h)
    eps = torch.randn(1, 1, 256, 256, generator=g, dtype=F64)
    out = flow_map_sde_step(s_dst.reshape(1, 1, 1, 1) * eps, s_src, s_to, h, torch.Generator().manual_seed(2))
    assert abs(out.std().item() - 0.5) < 0.01


def _ddim_policy(x, sigma, c):
    """K = 1, v = 0 GM predicting the fixed x0 = c: pi = (x - c) / sigma (a test double of a student)."""
    B = x.shape[0]
    sig = sigma.reshape(B, 1, 1, 1)
    m = (x - c) / sig
    return GMPolicy(m.unsqueeze(1), torch.zeros(B, 1, 1, *x.shape[2:], dtype=x.dtype),
                    torch.full((B, 1, 1, 1, 1), -400.0, dtype=x.dtype), x, sigma)


def test_sample_deterministic_ddim_and_trajectory():
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 2, 3, 3, generator=g, dtype=F64)
    c = torch.randn(1, 2, 3, 3, generator=g, dtype=F64)
    calls = []

    def make_policy(x, sigma):
        calls.append(sigma.clone())
        return _ddim_policy(x, sigma, c)

    x0, traj = sample(make_policy, noise, nfe=4, final_step_scale=0.5, shift=3.2, return_trajectory=True)
    # one student call per step at the grid sigmas
    expected = [1, 0.888889, 0.705882, 0.347826]
    assert len(calls) == 4 and all(torch.allclose(s, torch.full((2,), e, dtype=F64), atol=5e-7) for s, e in zip(calls, expected))
    # DDIM with a fixed x0 is exact: x_k = c + sigma_k (noise - c) / 1, ends at c
    _, sigmas = step_grid(4, 0.5, 3.2)
    assert len(traj) == 5
    for x_k, s_k in zip(traj, sigmas.tolist()):
        assert (x_k - (c + s_k * (noise - c))).abs().max() < 1e-12
    assert (x0 - c).abs().max() < 1e-12
    # the same with h > 0 (re-noising): the endpoint is still c (the last step lands at sigma 0)
    x0_sde = sample(make_policy, noise, 4, 0.5, 3.2, h=1.0, generator=torch.Generator().manual_seed(4))
    assert (x0_sde - c).abs().max() < 1e-12
    # DX student with one grid point behaves the same
    x0_dx = sample(lambda x, s: DXPolicy(c.expand(x.shape[0], -1, -1, -1).unsqueeze(1), x, s, 2 / 7, 3.2),
                   noise, 4, 0.5, 3.2)
    assert (x0_dx - c).abs().max() < 1e-12


def test_sample_h_positive_matches_manual_loop():
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 1, 2, 2, generator=g, dtype=F64)
    c = torch.randn(1, 1, 2, 2, generator=g, dtype=F64)
    h = 0.7
    out = sample(lambda x, s: _ddim_policy(x, s, c), noise, 3, 0.5, 3.2, h=h, generator=torch.Generator().manual_seed(6))
    taus, sigmas = step_grid(3, 0.5, 3.2)
    gen = torch.Generator().manual_seed(6)
    x = noise
    for k in range(3):
        s_k, s_to = float(sigmas[k]), float(sigmas[k + 1])
        m = ref_m(s_k, s_to, h) if s_k < 1 else 0.0
        s_dst = s_to * m / (1 - s_to + s_to * m)
        x_dst = c + (s_dst / s_k) * (x - c)  # exact DDIM move to sigma_dst
        if s_to > 0:
            z = torch.randn(x.shape, generator=gen, dtype=F64)
            x = (1 - s_to + s_to * m) * x_dst + s_to * math.sqrt(1 - m * m) * z
        else:
            x = x_dst
    assert (out - x).abs().max() < 1e-12


def test_temperature_on_every_step_but_the_last():
    g = torch.Generator().manual_seed(7)
    K = 3
    means = torch.randn(2, K, 1, 2, 2, generator=g, dtype=F64)
    logw = torch.randn(2, K, 1, 2, 2, generator=g, dtype=F64)
    make = lambda x, s: GMPolicy(means, logw, torch.full((2, 1, 1, 1, 1), math.log(0.3), dtype=F64), x, s)
    noise = torch.randn(2, 1, 2, 2, generator=g, dtype=F64)

    def manual(temps):
        taus, sigmas = step_grid(4, 0.5, 3.2)
        x = noise
        for k in range(4):
            p = make(x, torch.full((2,), float(sigmas[k]), dtype=F64)).with_temperature(temps[k])
            x = rollout(p, x, float(taus[k]), float(taus[k + 1]), 3.2)
        return x

    got = sample(make, noise, 4, 0.5, 3.2, temperature="auto")
    assert (got - manual([0.3, 0.3, 0.3, 1.0])).abs().max() < 1e-12
    assert (got - manual([0.3, 0.3, 0.3, 0.3])).abs().max() > 1e-6
    got1 = sample(make, noise, 4, 0.5, 3.2, temperature=1.0)
    assert (got1 - manual([1.0] * 4)).abs().max() < 1e-12
    # float32 student outputs give a float32 sample
    make32 = lambda x, s: GMPolicy(means.float(), logw.float(), torch.full((2, 1, 1, 1, 1), math.log(0.3)), x, s)
    out32 = sample(make32, noise.float(), 4, 0.5, 3.2)
    assert out32.dtype == torch.float32 and (out32.double() - got).abs().max() < 1e-3
