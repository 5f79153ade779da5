"""The 2-D toy: data and metric functions against closed forms / brute force, and the students at init."""
from __future__ import annotations

import math

import pytest
import torch

from models.families.toy2d import (NUM_MODES, ToyDXStudent, ToyGMStudent, ToyMixture, ToyVelocityNet,
                                   assign_modes, distribution_metrics, energy_distance, euler_sample,
                                   mode_fractions, mode_weight_error, modes_covered, off_mode_fraction, to_image)


def _brute_force_ed(x, y):
    """Energy distance V-statistic with explicit loops (float64)."""
    def mean_dist(a, b):
        total = 0.0
        for p in a.tolist():
            for q in b.tolist():
                total += math.dist(p, q)
        return total / (len(a) * len(b))
    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def test_energy_distance_matches_brute_force_and_is_zero_for_identical_sets():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, generator=g, dtype=torch.float64)
    y = torch.randn(41, 2, generator=g, dtype=torch.float64) * 1.5 + 0.3
    assert energy_distance(x, y) == pytest.approx(_brute_force_ed(x, y), rel=1e-10, abs=1e-12)
    assert energy_distance(x, x.clone()) == pytest.approx(0.0, abs=1e-12)
    # (B, 2, 1, 1) layout is accepted and gives the same value
    assert energy_distance(to_image(x), to_image(y)) == pytest.approx(energy_distance(x, y), rel=1e-12)


def test_energy_distance_against_closed_form_for_two_gaussians():
    # X ~ N(0, s1^2 I2), Y ~ N(0, s2^2 I2): |Z| of Z ~ N(0, s^2 I2) is Rayleigh with mean s sqrt(pi/2), so
    # ED = 2 sqrt(pi/2) sqrt(s1^2 + s2^2) - sqrt(pi) (s1 + s2).
    s1, s2 = 1.0, 2.0
    exact = 2 * math.sqrt(math.pi / 2) * math.sqrt(s1**2 + s2**2) - math.sqrt(math.pi) * (s1 + s2)
    g = torch.Generator().manual_seed(1)
    n = 3000
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) * s1
    y = torch.randn(n, 2, generator=g, dtype=torch.float64) * s2
    # V-statistic bias is about (E|X-X'| + E|Y-Y'|) / n = 0.0018; sampling noise ~0.01
    assert energy_distance(x, y) == pytest.approx(exact, abs=0.03)
    assert exact == pytest.approx(0.2880, abs=1e-3)


def test_mixture_is_well_separated_with_unequal_weights():
    mix = ToyMixture.default()
    assert mix.centres.shape == (NUM_MODES, 2) and NUM_MODES >= 8
    d = torch.cdist(mix.centres, mix.centres) + torch.eye(NUM_MODES) * 1e9
    assert float(d.min()) > 15 * mix.std  # 4-std balls (radius 4 std) are far apart
    assert float(mix.weights.sum()) == pytest.approx(1.0)
    assert float(mix.weights.max() / mix.weights.min()) == pytest.approx(3.0)
    x = mix.sample(40000, torch.Generator().manual_seed(2))
    a = assign_modes(x, mix.centres, mix.std)
    frac = mode_fractions(a, NUM_MODES)
    assert torch.allclose(frac, mix.weights, atol=0.01)
    # P(|Z| > 4) for a 2-D standard normal is exp(-8) = 3.4e-4
    assert off_mode_fraction(a) < 2e-3


def test_mode_assignment_off_mode_and_tv_on_constructed_samples():
    mix = ToyMixture.default()
    c, s = mix.centres, mix.std
    pts = torch.stack([
        c[0], c[0] + torch.tensor([3.9 * s, 0.0], dtype=torch.float64),  # on mode 0 (inside 4 std)
        c[1], c[1], c[1], c[2],  # on modes 1, 2
        c[0] + torch.tensor([4.1 * s, 0.0], dtype=torch.float64),  # just outside 4 std
        torch.zeros(2, dtype=torch.float64),  # the origin is far from every centre
    ])
    a = assign_modes(pts, c, s)
    assert a.tolist() == [0, 0, 1, 1, 1, 2, -1, -1]
    assert off_mode_fraction(a) == pytest.approx(2 / 8)
    frac = mode_fractions(a, NUM_MODES)
    expected = torch.zeros(NUM_MODES, dtype=torch.float64)
    expected[:3] = torch.tensor([2, 3, 1], dtype=torch.float64) / 6
    assert torch.allclose(frac, expected)
    ref = torch.full((NUM_MODES,), 1 / NUM_MODES, dtype=torch.float64)
    # TV = 0.5 * sum |p - q| computed by hand
    tv = 0.5 * (abs(2 / 6 - 1 / 8) + abs(3 / 6 - 1 / 8) + abs(1 / 6 - 1 / 8) + 5 * (1 / 8))
    assert mode_weight_error(frac, ref) == pytest.approx(tv)
    assert modes_covered(frac, ref) == 3
    assert modes_covered(ref, ref) == NUM_MODES


def test_distribution_metrics_of_a_set_against_itself():
    mix = ToyMixture.default()
    x = mix.sample(2000, torch.Generator().manual_seed(3))
    m = distribution_metrics(x, x, mix)
    assert m["ed"] == pytest.approx(0.0, abs=1e-12)
    assert m["modes_covered"] == NUM_MODES and m["mode_weight_error"] == 0.0


def _tiny_teacher(seed=0):
    torch.manual_seed(seed)
    net = ToyVelocityNet(hidden_dim=32, num_layers=2)
    with torch.no_grad():  # a non-trivial output bias, so the check below is not 0 == 0
        net.proj_out.bias.copy_(torch.tensor([0.3, -0.7]))
    return net.eval().requires_grad_(False)


def test_gm_student_at_init_reproduces_the_teacher_velocity():
    teacher = _tiny_teacher()
    student = ToyGMStudent(teacher, num_components=8, bias_noise=0.0, logstd_inner_dim=16)
    g = torch.Generator().manual_seed(4)
    x = to_image(torch.randn(16, 2, generator=g))
    sigma = torch.rand(16, generator=g) * 0.9 + 0.05
    u_teacher = teacher(x, sigma)
    means, logweights, logstd = student(x, sigma)
    assert means.shape == (16, 8, 2, 1, 1) and logweights.shape == (16, 8, 1, 1, 1) and logstd.shape == (16, 1, 1, 1, 1)
    for k in range(8):
        torch.testing.assert_close(means[:, k], u_teacher, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logweights.exp(), torch.full_like(logweights, 1 / 8))
    torch.testing.assert_close(logstd, torch.full_like(logstd, math.log(0.05)))
    policy = student.make_policy(x, sigma, None)
    torch.testing.assert_close(policy.velocity(x, sigma), u_teacher, rtol=1e-5, atol=1e-5)


def test_gm_student_bias_noise_is_per_component_and_channel():
    teacher = _tiny_teacher()
    student = ToyGMStudent(teacher, num_components=8, bias_noise=0.05, logstd_inner_dim=16,
                           generator=torch.Generator().manual_seed(5))
    x = to_image(torch.randn(4, 2))
    sigma = torch.full((4,), 0.5)
    means, _, _ = student(x, sigma)
    offsets = means - teacher(x, sigma)[:, None]  # (B, K, 2, 1, 1): the same noise for every sample
    torch.testing.assert_close(offsets, offsets[:1].expand_as(offsets), rtol=0, atol=1e-5)
    assert 0.01 < float(offsets[0].detach().std()) < 0.15


def test_dx_student_at_init_predicts_the_teacher_x0_on_every_grid_point():
    teacher = _tiny_teacher()
    student = ToyDXStudent(teacher, num_grid=10, segment=0.25, shift=1.0)
    x = to_image(torch.randn(8, 2))
    sigma = torch.linspace(0.2, 1.0, 8)
    grid = student(x, sigma)
    x0_teacher = x - sigma.view(-1, 1, 1, 1) * teacher(x, sigma)
    assert grid.shape == (8, 10, 2, 1, 1)
    for i in range(10):
        torch.testing.assert_close(grid[:, i], x0_teacher, rtol=1e-5, atol=1e-5)


def test_dx_polynomial_student_at_init_holds_the_teacher_x0_and_trains_its_higher_terms():
    teacher = _tiny_teacher()
    student = ToyDXStudent(teacher, num_grid=5, segment=0.25, shift=1.0, mode="polynomial")
    x = to_image(torch.randn(8, 2))
    sigma = torch.linspace(0.3, 1.0, 8)
    policy = student.make_policy(x, sigma)
    x0_teacher = x - sigma.view(-1, 1, 1, 1) * teacher(x, sigma)
    for f in (1.0, 0.9, 0.75):
        torch.testing.assert_close(policy.x0(sigma * f), x0_teacher, rtol=1e-5, atol=1e-5)
    # the zero-initialised higher coefficients still receive gradients through the velocity
    policy.velocity(x, sigma * 0.8).pow(2).sum().backward()
    w = student.head.proj_out.weight.grad.reshape(5, 2, -1)
    assert float(w[1:].abs().max()) > 0


def test_euler_sample_one_step_is_noise_minus_velocity():
    teacher = _tiny_teacher()
    z = to_image(torch.randn(8, 2))
    expected = z - teacher(z, torch.ones(8))
    torch.testing.assert_close(euler_sample(lambda x, s, cond: teacher(x, s), z, 1), expected)
