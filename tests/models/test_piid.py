"""pi-ID loss (PIFLOW.md §3.3-§3.5; §8 properties 4 and 15), gradient routing, and the planned vs sequential
forms of a segment."""
import math

import pytest
import torch

from models.piid import (PiIDParams, data_free_iteration, piid_segment, plan_queries, segment_bounds,
                         segment_loss, teacher_ratio)
from models.policies import DXPolicy, GMPolicy
from models.rollout import rollout
from models.timesteps import unwarp, warp

F64 = torch.float64
SHIFT = 3.2


def params(**kw):
    base = dict(nfe=4, final_step_scale=0.5, shift=SHIFT, total_substeps=128, num_intermediate=3,
                window_substeps=0, loss_scale=3.0, dropout=0.0)
    base.update(kw)
    return PiIDParams(**base)


class GaussianData:
    """Data N(mu_d, s_d^2 I): exact teacher velocity and exact K = 1 posterior GM (property 4), float64."""

    def __init__(self, shape=(2, 3, 3), s_d=0.6, seed=0):
        self.mu_d = torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
        self.s_d = s_d

    def posterior(self, x, sigma):
        B = x.shape[0]
        s = torch.as_tensor(sigma, dtype=F64).reshape(B, 1, 1, 1)
        a = 1 - s
        prec = 1 / self.s_d**2 + a**2 / s**2
        return (self.mu_d / self.s_d**2 + a * x / s**2) / prec, 1 / prec

    def teacher(self, x, sigma, cond=None):
        mean, _ = self.posterior(x, sigma)
        return (x - mean) / torch.as_tensor(sigma, dtype=F64).reshape(-1, 1, 1, 1)

    def exact_policy(self, x_src, sigma_src):
        B, C, H, W = x_src.shape
        mean, var = self.posterior(x_src, sigma_src)
        s = torch.as_tensor(sigma_src, dtype=F64).reshape(B, 1, 1, 1)
        m = (x_src - mean) / s  # u-space mean
        logstd = 0.5 * torch.log(var.reshape(B, 1, 1, 1, 1) / s.reshape(B, 1, 1, 1, 1) ** 2)
        return GMPolicy(m.unsqueeze(1), torch.zeros(B, 1, 1, H, W, dtype=F64), logstd, x_src, sigma_src)


def random_policy(B=3, K=4, seed=0, sigma_src=(0.95, 0.75, 0.6), requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    leaves = dict(means=torch.randn(B, K, 2, 3, 3, generator=g, dtype=F64),
                  logweights=torch.randn(B, K, 1, 3, 3, generator=g, dtype=F64),
                  logstd=torch.full((B, 1, 1, 1, 1), math.log(0.2), dtype=F64))
    if requires_grad:
        for t in leaves.values():
            t.requires_grad_(True)
    x_src = torch.randn(B, 2, 3, 3, generator=g, dtype=F64)
    return leaves, x_src, torch.tensor(sigma_src, dtype=F64)


class RecordingTeacher:
    """A real velocity function (Gaussian-data oracle) that records what it was asked and what it answered."""

    def __init__(self, data, weight=None):
        self.data, self.weight, self.calls = data, weight, []

    def __call__(self, x, sigma, cond):
        u = self.data.teacher(x, sigma)
        if self.weight is not None:  # a teacher parameter: must never receive a gradient
            u = u * self.weight
        self.calls.append((x, sigma, u, cond))
        return u


def test_property_04_gaussian_oracle_policy_equals_teacher_and_loss_is_zero():
    data = GaussianData()
    g = torch.Generator().manual_seed(1)
    B = 3
    sigma_src = torch.tensor([0.95, 0.6, 0.3], dtype=F64)
    x0 = data.mu_d + data.s_d * torch.randn(B, 2, 3, 3, generator=g, dtype=F64)
    x_src = (1 - sigma_src.reshape(B, 1, 1, 1)) * x0 + sigma_src.reshape(B, 1, 1, 1) * torch.randn(B, 2, 3, 3, generator=g, dtype=F64)
    policy = data.exact_policy(x_src, sigma_src)
    # pi = u* for every x_t and sigma_t <= sigma_src
    for frac in (1.0, 0.7, 0.2, 0.01):
        x_t = 3 * torch.randn(B, 2, 3, 3, generator=g, dtype=F64)
        sigma_t = sigma_src * frac
        assert (policy.velocity(x_t, sigma_t) - data.teacher(x_t, sigma_t)).abs().max() < 1e-11
    # so the pi-ID loss is 0 (window 0, r = 0)
    tau_src = unwarp(sigma_src, SHIFT)
    segment = torch.minimum(torch.full_like(tau_src, 2 / 7), 0.9 * tau_src)  # stay above sigma = 0
    loss, metrics = piid_segment(policy, x_src, tau_src, segment,
                                 RecordingTeacher(data), None, params(), 0.0, torch.Generator().manual_seed(2))
    assert loss.item() < 1e-22 and metrics["u_teacher_rms"] > 0.1
    # and every step of the data-free iteration too
    noise = torch.randn(B, 2, 3, 3, generator=g, dtype=F64)
    steps = list(data_free_iteration(data.exact_policy, RecordingTeacher(data), noise, None, params(), 0.0,
                                     torch.Generator().manual_seed(3)))
    assert len(steps) == 4 and all(w.item() < 1e-22 for w, _ in steps)
    # a wrong policy gives a clearly positive loss
    wrong = GMPolicy(policy.means + 0.3, policy.logweights, policy.logstd, x_src, sigma_src)
    bad, _ = piid_segment(wrong, x_src, tau_src, segment, RecordingTeacher(data), None, params(), 0.0,
                          torch.Generator().manual_seed(2))
    assert bad.item() > 1e-3


@pytest.mark.parametrize("window, r", [(0, 0.0), (3, 0.6)])
def test_property_15_loss_scale_bookkeeping(window, r):
    leaves, x_src, sigma_src = random_policy(seed=4)
    policy = GMPolicy(**leaves, x_src=x_src, sigma_src=sigma_src)
    teacher = RecordingTeacher(GaussianData(seed=5))
    p = params(window_substeps=window, loss_scale=30.0, num_intermediate=2)
    tau_src = unwarp(sigma_src, SHIFT)
    segment = torch.tensor([2 / 7, 2 / 7, 1 / 7], dtype=F64)
    loss, metrics = piid_segment(policy, x_src, tau_src, segment, teacher, "cond", p, r,
                                 torch.Generator().manual_seed(6))
    assert len(teacher.calls) == 2 and all(c[3] == "cond" for c in teacher.calls)
    assert abs(loss.item() - 30.0 * 0.5 * metrics["mse"].item()) < 1e-12
    assert metrics["loss"].item() == loss.item() and metrics["teacher_ratio"] == r
    if window == 0 and r == 0:
        # L = scale * 0.5 * mean over all elements of all n_int * B pairs = mean of the per-pair losses
        u_pred = torch.stack([policy.velocity(x, s) for x, s, _, _ in teacher.calls])
        u_tgt = torch.stack([u for _, _, u, _ in teacher.calls])
        per_pair = torch.stack([0.5 * ((u_pred[i, b] - u_tgt[i, b]) ** 2).mean() for i in range(2) for b in range(3)])
        assert abs(loss.item() - 30.0 * per_pair.mean().item()) < 1e-12
    # query times are non-increasing and lie inside [tau_src - (S - w), tau_src]
    s = torch.stack([c[1] for c in teacher.calls])
    assert torch.all(s <= sigma_src[None] + 1e-15) and torch.all(s[1] <= s[0] + 1e-15)
    n_seg = torch.round(segment * 128).clamp(min=1)
    w = torch.minimum(window * segment / n_seg, segment)
    assert torch.all(unwarp(s, SHIFT) >= tau_src - (segment - w) - 1e-12)


def test_loss_with_window_against_independent_reference():
    # window 3, r = 0: prediction = (x_a - x_end) / (sigma_a - sigma_end) of a 3-substep Euler rollout
    leaves, x_src, sigma_src = random_policy(seed=7)
    policy = GMPolicy(**leaves, x_src=x_src, sigma_src=sigma_src)
    data = GaussianData(seed=8)
    teacher = RecordingTeacher(data)
    p = params(window_substeps=3, num_intermediate=2)
    segment = 2 / 7
    loss, _ = piid_segment(policy, x_src, unwarp(sigma_src, SHIFT), segment, teacher, None, p, 0.0,
                           torch.Generator().manual_seed(9))
    w = 3 * segment / round(segment * 128)  # 3 substeps of the segment's own substep length
    sq = []
    for x_a, sigma_a, u_t, _ in teacher.calls:
        for b in range(3):
            pb = GMPolicy(**{k: v[b:b + 1] for k, v in leaves.items()}, x_src=x_src[b:b + 1], sigma_src=sigma_src[b:b + 1])
            t0 = float(unwarp(sigma_a[b], SHIFT))
            t1 = max(t0 - w, 0.0)
            n = max(1, round((t0 - t1) * 128))
            x = x_a[b:b + 1]
            for j in range(n):
                ta, tb = t0 + (t1 - t0) * j / n, t0 + (t1 - t0) * (j + 1) / n
                x = x + pb.velocity(x, torch.tensor([warp(ta, SHIFT)], dtype=F64)) * (warp(tb, SHIFT) - warp(ta, SHIFT))
            if n >= 2:
                pred = (x_a[b:b + 1] - x) / max(warp(t0, SHIFT) - warp(t1, SHIFT), 1e-4)
            else:
                pred = pb.velocity(x_a[b:b + 1], sigma_a[b:b + 1])
            sq.append(((pred - u_t[b:b + 1]) ** 2).mean())
    assert abs(loss.item() - 3.0 * 0.5 * torch.stack(sq).mean().item()) < 1e-12


def test_teacher_ratio_one_follows_teacher_trajectory():
    # r = 1: all student gaps are 0, queries are reached by teacher Euler steps from x_src
    leaves, x_src, sigma_src = random_policy(seed=10)
    policy = GMPolicy(**leaves, x_src=x_src, sigma_src=sigma_src)
    data = GaussianData(seed=11)
    teacher = RecordingTeacher(data)
    tau_src = unwarp(sigma_src, SHIFT)
    piid_segment(policy, x_src, tau_src, 2 / 7, teacher, None, params(num_intermediate=3), 1.0,
                 torch.Generator().manual_seed(12))
    x0, s0, u0, _ = teacher.calls[0]
    assert torch.equal(x0, x_src) and torch.allclose(s0, sigma_src, atol=1e-15, rtol=0)
    for (xa, sa, ua, _), (xb, sb, _, _) in zip(teacher.calls[:-1], teacher.calls[1:]):
        euler = xa + ua * (sb - sa).reshape(-1, 1, 1, 1)
        assert (xb - euler).abs().max() < 1e-13
    total = tau_src - unwarp(teacher.calls[-1][1], SHIFT)
    assert torch.all(total <= 2 / 7 + 1e-12)


def test_gradients_reach_only_policy_parameters():
    leaves, x_src, sigma_src = random_policy(seed=13, requires_grad=True)
    x_src.requires_grad_(False)
    policy = GMPolicy(**leaves, x_src=x_src, sigma_src=sigma_src)
    t_weight = torch.tensor(1.0, dtype=F64, requires_grad=True)
    teacher = RecordingTeacher(GaussianData(seed=14), weight=t_weight)
    p = params(window_substeps=3, dropout=0.3)
    loss, _ = piid_segment(policy, x_src, unwarp(sigma_src, SHIFT), 2 / 7, teacher, None, p, 0.3,
                           torch.Generator().manual_seed(15))
    assert all(not x.requires_grad and not u.requires_grad for x, _, u, _ in teacher.calls)
    loss.backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0, name
    assert t_weight.grad is None

    # window 0, r = 0: the gradient equals that of the reference loss built from recorded (x_a, sigma_a, u)
    leaves, x_src, sigma_src = random_policy(seed=16, requires_grad=True)
    teacher = RecordingTeacher(GaussianData(seed=17))
    policy = GMPolicy(**leaves, x_src=x_src, sigma_src=sigma_src)
    loss, _ = piid_segment(policy, x_src, unwarp(sigma_src, SHIFT), 2 / 7, teacher, None, params(), 0.0,
                           torch.Generator().manual_seed(18))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    ref_policy = GMPolicy(**leaves, x_src=x_src, sigma_src=sigma_src)
    ref = 1.5 * torch.stack([((ref_policy.velocity(x, s) - u) ** 2).mean() for x, s, u, _ in teacher.calls]).mean()
    ref_grads = torch.autograd.grad(ref, list(leaves.values()))
    for g_got, g_ref in zip(grads, ref_grads):
        assert torch.allclose(g_got, g_ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("window", [0, 3])
def test_plan_queries_plus_segment_loss_equals_piid_segment(window):
    leaves, x_src, sigma_src = random_policy(seed=19, requires_grad=True)
    data = GaussianData(seed=20)
    p = params(window_substeps=window, dropout=0.3, num_intermediate=3)
    tau_src = unwarp(sigma_src, SHIFT)
    segment = torch.tensor([2 / 7, 2 / 7, 1 / 7], dtype=F64)

    policy = GMPolicy(**leaves, x_src=x_src, sigma_src=sigma_src)
    loss_seq, _ = piid_segment(policy, x_src, tau_src, segment, RecordingTeacher(data), None, p, 0.0,
                               torch.Generator().manual_seed(21))
    g_seq = torch.autograd.grad(loss_seq, list(leaves.values()))

    policy = GMPolicy(**leaves, x_src=x_src, sigma_src=sigma_src)
    q = plan_queries(policy.detach(), x_src, tau_src, segment, p, 0.0, torch.Generator().manual_seed(21))
    assert q.x_a.shape == (3, 3, 2, 3, 3) and q.sigma_a.shape == (3, 3) and not q.x_a.requires_grad
    u = torch.stack([data.teacher(q.x_a[i], q.sigma_a[i]) for i in range(3)])
    loss_plan, _ = segment_loss(policy, q, u, p)
    g_plan = torch.autograd.grad(loss_plan, list(leaves.values()))
    assert abs(loss_plan.item() - loss_seq.item()) < 1e-12
    for a, b in zip(g_plan, g_seq):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="teacher_ratio == 0"):
        plan_queries(policy, x_src, tau_src, segment, p, 0.5)
    with pytest.raises(ValueError, match="u_teacher must have shape"):
        segment_loss(policy, q, u[:2], p)


@pytest.mark.parametrize("r", [0.0, 0.4])
def test_data_free_iteration_weights_and_trajectory(r):
    data = GaussianData(seed=22)
    leaves, _, _ = random_policy(seed=23, K=3)
    inputs = []

    def make_policy(x, sigma):
        inputs.append((x, sigma))
        return GMPolicy(**leaves, x_src=x, sigma_src=sigma)

    teacher = RecordingTeacher(data)
    noise = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(24), dtype=F64)
    p = params(num_intermediate=2, window_substeps=3)
    out = list(data_free_iteration(make_policy, teacher, noise, None, p, r, torch.Generator().manual_seed(25)))
    S = [2 / 7, 2 / 7, 2 / 7, 1 / 7]
    assert len(out) == 4
    for (weighted, m), s_k in zip(out, S):
        assert abs(weighted.item() - s_k * m["loss"].item()) < 1e-14 and m["segment"] == pytest.approx(s_k, abs=1e-15)
    # student inputs: noise at sigma = 1, then sigmas of the grid
    assert torch.equal(inputs[0][0], noise)
    expected_sigmas = [1.0, 0.888889, 0.705882, 0.347826]
    for (x, sigma), s_exp in zip(inputs, expected_sigmas):
        assert torch.allclose(sigma, torch.full((3,), s_exp, dtype=F64), atol=5e-7) and not x.requires_grad
    # next start = detached policy rolled on from the segment's last query state (after its teacher step when
    # r > 0; recovered here from the recorded query and answer) to tau - S
    taus = [1.0, 5 / 7, 3 / 7, 1 / 7]
    # r = 0: ONE teacher call per segment with all n_int x B queries (query i of sample b in row i*B + b);
    # r > 0: one call per query (each starts from the teacher's Euler step at the previous one)
    assert [c[0].shape[0] for c in teacher.calls] == ([2 * 3] * 4 if r == 0 else [3] * 8)
    for k in range(3):
        x_k, sigma_k = inputs[k]
        pol = GMPolicy(**leaves, x_src=x_k, sigma_src=sigma_k)
        if r > 0:
            continue  # the teacher step's end tau_b is internal; the weights above are still checked
        x_a, sigma_a, u_a, _ = teacher.calls[k]
        x_last, tau_last = x_a[3:], unwarp(sigma_a[3:], SHIFT)
        ref = rollout(pol, x_last, tau_last, taus[k + 1], SHIFT)
        assert (inputs[k + 1][0] - ref).abs().max() < 1e-12


def test_segment_bounds_on_the_grid_draw_nothing_and_jitter_moves_interior_boundaries_per_sample():
    g = torch.Generator().manual_seed(40)
    state = g.get_state()
    grid = [b[0].item() for b in segment_bounds(params(), 5, "cpu", g)]
    assert grid == pytest.approx([1.0, 5 / 7, 3 / 7, 1 / 7, 0.0], abs=1e-15)
    assert torch.equal(g.get_state(), state)  # j = 0: the random stream of existing runs is unchanged
    n, j = 20000, 0.4
    bounds = torch.stack(segment_bounds(params(boundary_jitter=j), n, "cpu", torch.Generator().manual_seed(41)))
    assert torch.equal(bounds[0], torch.ones(n, dtype=F64)) and torch.equal(bounds[4], torch.zeros(n, dtype=F64))
    assert (bounds[:-1] - bounds[1:]).min() > 0  # every segment still has positive length
    # boundary k is uniform on tau_k +- j x its shorter neighbouring segment (2/7, 2/7, 1/7 here)
    for k, (tau_k, shorter) in enumerate([(5 / 7, 2 / 7), (3 / 7, 2 / 7), (1 / 7, 1 / 7)], start=1):
        reach = j * shorter
        b = bounds[k]
        assert b.min() >= tau_k - reach - 1e-15 and b.max() <= tau_k + reach + 1e-15
        assert b.min() < tau_k - 0.99 * reach and b.max() > tau_k + 0.99 * reach
        assert b.mean().item() == pytest.approx(tau_k, abs=3 * reach / math.sqrt(3 * n))
        assert b.var().item() == pytest.approx(reach ** 2 / 3, rel=0.05)
    assert len(set(bounds[1].tolist())) == n  # per sample
    with pytest.raises(ValueError, match="PiIDParams.boundary_jitter"):
        params(boundary_jitter=0.5)


def test_data_free_iteration_with_jitter_starts_each_segment_where_the_last_one_ended():
    data = GaussianData(seed=42)
    leaves, _, _ = random_policy(seed=43, K=3)
    inputs = []

    def make_policy(x, sigma):
        inputs.append(sigma)
        return GMPolicy(**leaves, x_src=x, sigma_src=sigma)

    p = params(num_intermediate=2, boundary_jitter=0.3)
    noise = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(44), dtype=F64)
    teacher = RecordingTeacher(data)
    out = list(data_free_iteration(make_policy, teacher, noise, None, p, 0.0, torch.Generator().manual_seed(45)))
    bounds = segment_bounds(p, 3, "cpu", torch.Generator().manual_seed(45))  # the iteration's first draws
    for k, sigma in enumerate(inputs):
        assert torch.allclose(sigma, warp(bounds[k], SHIFT), atol=1e-15)
    assert len(set(inputs[1].tolist())) == 3  # off the grid, per sample
    for k in range(4):  # every teacher query of segment k lies inside that sample's own segment
        _, sigma_a, _, _ = teacher.calls[k]  # one call: n_int x B queries, row i*B + b
        for tau_a in unwarp(sigma_a, SHIFT).view(2, 3):
            assert bool(((tau_a <= bounds[k] + 1e-12) & (tau_a >= bounds[k + 1] - 1e-12)).all())
    assert [m["segment"] for _, m in out] == pytest.approx([2 / 7, 2 / 7, 2 / 7, 1 / 7])  # nominal weights


def test_teacher_ratio_schedule_and_param_validation():
    assert teacher_ratio(0, 2000) == 1.0
    assert teacher_ratio(500, 2000) == 0.75
    assert teacher_ratio(2000, 2000) == 0.0 and teacher_ratio(2500, 2000) == 0.0
    assert teacher_ratio(10, 0) == 0.0
    with pytest.raises(ValueError, match="PiIDParams.dropout"):
        params(dropout=1.0)
    with pytest.raises(ValueError, match="PiIDParams.num_intermediate"):
        params(num_intermediate=0)
    leaves, x_src, sigma_src = random_policy(seed=30)
    with pytest.raises(ValueError, match="teacher_ratio must be in"):
        piid_segment(GMPolicy(**leaves, x_src=x_src, sigma_src=sigma_src), x_src, 0.9, 0.2,
                     RecordingTeacher(GaussianData()), None, params(), 1.5)


def test_dx_policy_in_a_segment_ignores_dropout():
    # DX ignores dropout: the same loss with dropout 0 and 0.5 (same generator stream otherwise unused)
    g = torch.Generator().manual_seed(31)
    x_src = torch.randn(2, 2, 3, 3, generator=g, dtype=F64)
    sigma_src = torch.tensor([1.0, 0.8], dtype=F64)
    grid = torch.randn(2, 4, 2, 3, 3, generator=g, dtype=F64)
    policy = DXPolicy(grid, x_src, sigma_src, segment=2 / 7, shift=SHIFT)
    data = GaussianData(seed=32)
    losses = [piid_segment(policy, x_src, unwarp(sigma_src, SHIFT), 2 / 7, RecordingTeacher(data), None,
                           params(dropout=d), 0.0, torch.Generator().manual_seed(33))[0].item() for d in (0.0, 0.5)]
    assert losses[0] == losses[1] and losses[0] > 0


@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_overlapped_iteration_equals_the_sequential_one(jitter):
    from trainer.overlap import overlapped_iteration

    data = GaussianData(seed=46)
    leaves, _, _ = random_policy(seed=47, K=3, requires_grad=True)
    noise = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(48), dtype=F64)
    p = params(num_intermediate=2, boundary_jitter=jitter)

    def run(iteration):
        def make_policy(x, sigma):
            return GMPolicy(**leaves, x_src=x, sigma_src=sigma)

        teacher = RecordingTeacher(data)
        out = list(iteration(make_policy, teacher, noise, torch.zeros(3, 1, dtype=F64), p, 0.0,
                             torch.Generator().manual_seed(49)))
        return [w.item() for w, _ in out], teacher.calls

    (seq, seq_calls), (ovl, ovl_calls) = run(data_free_iteration), run(overlapped_iteration)
    assert seq == pytest.approx(ovl, rel=1e-12, abs=1e-15)
    seq_sigmas = torch.cat([c[1] for c in seq_calls])
    assert torch.allclose(seq_sigmas, torch.cat([c[1] for c in ovl_calls]), atol=1e-15)
