"""Policy-based imitation distillation pi-ID (PIFLOW.md §3.3-§3.5).

One training segment: the detached (dropout-applied) student policy is rolled out from x_src to n_int random
intermediate times; the teacher is queried there; the student's (window-averaged) policy velocity at each query
state is matched to the teacher's velocity. Gradients reach the network only through the policy parameters in
the prediction: query states and teacher outputs are detached. Nothing here calls backward.

Two forms of the same segment:
- `plan_queries` + `segment_loss` (r = 0 only): all query states come from one detached rollout, so every
  teacher query of a segment goes to the teacher as ONE call of n_int x B rows (`ask_teacher`; the teacher
  bounds its own forward batch, `teacher.micro_batch`) and can overlap other work (DESIGN.md §4);
- `piid_segment`: the sequential reference of §3.3, also for r > 0, where the queries are sequential by nature:
  query i + 1 starts from the teacher's Euler step at query i, so a segment makes n_int teacher calls.
Both draw their random numbers in the same order, so with the same generator they give the same loss.

Two trainers share them: `data_free_iteration` (§3.4: every segment of a trajectory started from noise) and
`data_iteration` (§3.1: one segment per sample, started from a noised data latent).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from models.rollout import rollout, rollout_to_points, window_average_velocity
from models.sample_rng import SampleRNG
from models.timesteps import as_batch, num_substeps, step_grid, warp


@dataclass(frozen=True)
class PiIDParams:
    """pi-ID settings; the trainer maps its config onto this (models/ never imports the trainer)."""

    nfe: int  # student steps
    final_step_scale: float  # f: the last segment is f times the others
    shift: float  # sigma = warp(tau, shift)
    total_substeps: int  # rollout substeps per unit raw time (128)
    num_intermediate: int  # n_int query states per segment
    window_substeps: float  # window of the averaged prediction, in substeps (0 = local velocity)
    loss_scale: float  # L = loss_scale * 0.5 * mean((u_pred - u_teacher)^2)
    dropout: float  # GM component dropout on the detached rollout policy
    boundary_jitter: float = 0.0  # data-free: interior segment boundaries move by U(-j, j) x the shorter side

    def __post_init__(self):
        checks = [
            (self.nfe >= 1, "nfe", "must be >= 1"),
            (self.final_step_scale > 0, "final_step_scale", "must be > 0"),
            (self.shift > 0, "shift", "must be > 0"),
            (self.total_substeps >= 1, "total_substeps", "must be >= 1"),
            (self.num_intermediate >= 1, "num_intermediate", "must be >= 1"),
            (self.window_substeps >= 0, "window_substeps", "must be >= 0"),
            (0 <= self.dropout < 1, "dropout", "must be in [0, 1)"),
            (0 <= self.boundary_jitter < 0.5, "boundary_jitter", "must be in [0, 0.5)"),
        ]
        for ok, key, what in checks:
            if not ok:
                raise ValueError(f"PiIDParams.{key} {what}, got {getattr(self, key)!r}")


def teacher_ratio(iteration: int, decay_iters: int) -> float:
    """Scheduled trajectory mixing (§3.3): r = 1 - min(iter, D) / D, linear from 1 to 0; D = 0 means r = 0."""
    if decay_iters <= 0:
        return 0.0
    return 1.0 - min(iteration, decay_iters) / decay_iters


@dataclass
class PiIDQueries:
    """The teacher queries of one r = 0 segment (all detached). n_int = number of queries, B = batch."""

    x_a: torch.Tensor  # (n_int, B, C, H, W) query states on the detached policy's trajectory
    tau_a: torch.Tensor  # (n_int, B) float64 raw times of the queries
    sigma_a: torch.Tensor  # (n_int, B) float64 noise levels of the queries
    tau_b: torch.Tensor  # (n_int, B) float64 end of each teacher step (= tau_a when r = 0)
    tau_window_end: torch.Tensor  # (n_int, B) float64 end of each prediction window, max(tau_b - w, 0)
    x_end: torch.Tensor | None = None  # (B, C, H, W) detached state at tau_src - segment, when asked for


def _window(segment: torch.Tensor, params: PiIDParams) -> torch.Tensor:
    """w = min(window_substeps * S / n_seg, S) with n_seg = max(1, round(S * total_substeps)), (B,)."""
    n_seg = num_substeps(segment, params.total_substeps).to(segment.dtype)
    return torch.minimum(params.window_substeps * segment / n_seg, segment)


def _uniform(n: int, batch_size: int, generator, device) -> torch.Tensor:
    """(n, B) float64 U(0, 1); with a `SampleRNG` each sample draws its own n numbers."""
    if isinstance(generator, SampleRNG):
        return generator.rand(n, dtype=torch.float64, device=device).T.to(device)
    gen_device = generator.device if generator is not None else device
    return torch.rand((n, batch_size), generator=generator, device=gen_device, dtype=torch.float64).to(device)


def segment_bounds(params: PiIDParams, batch_size: int, device, generator=None) -> list[torch.Tensor]:
    """The data-free rollout's nfe + 1 segment boundaries in raw time, each (B,) float64, from 1 down to 0.

    On the step grid by default. With `boundary_jitter` j > 0 each interior boundary moves, per sample, by
    U(-j, j) x the shorter of its two grid segments, so the student also learns sigma_src between the grid's
    points: sampling at more steps than it was trained for (elastic inference) then queries states it has
    seen. j < 0.5 keeps every segment longer than 0. Draws nothing when j = 0 (the random stream is unchanged).
    """
    taus, _ = step_grid(params.nfe, params.final_step_scale, params.shift)
    bounds = [as_batch(float(t), batch_size, device) for t in taus]
    if params.boundary_jitter > 0 and params.nfe > 1:
        u = _uniform(params.nfe - 1, batch_size, generator, device)  # (nfe - 1, B)
        for k in range(1, params.nfe):
            reach = params.boundary_jitter * float(min(taus[k - 1] - taus[k], taus[k] - taus[k + 1]))
            bounds[k] = bounds[k] + (2 * u[k - 1] - 1) * reach
    return bounds


def _draw_gaps(batch_size: int, n_int: int, r: float, span: torch.Tensor, generator, device):
    """Student and teacher raw-time gaps (§3.3 step 3), each (n_int, B) float64. span = S - w, (B,).

    Student: sorted U(0,1) x n_int, successive differences from 0, times (1 - r) * span.
    Teacher: sorted U(0,1) x (n_int - 1) with 0 prepended and 1 appended, differences, times r * span.
    Both are always drawn (same random stream whatever r). With a `SampleRNG` each sample draws its own.
    """
    u_s = _uniform(n_int, batch_size, generator, device).sort(dim=0).values  # (n_int, B)
    u_t = _uniform(n_int - 1, batch_size, generator, device).sort(dim=0).values
    zeros = torch.zeros((1, batch_size), dtype=torch.float64, device=device)
    ones = torch.ones((1, batch_size), dtype=torch.float64, device=device)
    student = torch.diff(torch.cat([zeros, u_s]), dim=0) * ((1 - r) * span)
    teacher = torch.diff(torch.cat([zeros, u_t, ones]), dim=0) * (r * span)
    return student, teacher


def _prepare(policy, x_src, tau_src, segment, params, r, generator):
    """Shared set-up of both forms: the detached dropout policy, (B,) times, window and gaps (fixed RNG order)."""
    if not 0 <= r <= 1:
        raise ValueError(f"teacher_ratio must be in [0, 1], got {r}")
    B, device = x_src.shape[0], x_src.device
    tau_src = as_batch(tau_src, B, device)
    segment = as_batch(segment, B, device)
    policy_d = policy.detach().with_dropout(params.dropout, generator)
    w = _window(segment, params)
    gap_s, gap_t = _draw_gaps(B, params.num_intermediate, r, segment - w, generator, device)
    return policy_d, tau_src, segment, w, gap_s, gap_t


def _loss(u_pred: torch.Tensor, u_teacher: torch.Tensor, params: PiIDParams, r: float):
    """L = scale * 0.5 * mean over all elements of all n_int * B pairs (§3.5); plus detached metrics."""
    err = u_pred - u_teacher
    loss = params.loss_scale * 0.5 * err.pow(2).mean()
    metrics = {
        "loss": loss.detach(),
        "mse": err.detach().pow(2).mean(),
        "u_teacher_rms": u_teacher.detach().pow(2).mean().sqrt(),
        "u_pred_rms": u_pred.detach().pow(2).mean().sqrt(),
        "teacher_ratio": r,
    }
    return loss, metrics


def plan_queries(policy_detached, x, tau_src, segment, params: PiIDParams, teacher_ratio: float = 0.0,
                 generator: torch.Generator | None = None, rollout_to_segment_end: bool = False) -> PiIDQueries:
    """All teacher queries of an r = 0 segment from one detached rollout (§3.3 with r = 0).

    x (B, C, H, W) = x_src; tau_src, segment: floats or (B,). The policy is detached here again and dropout is
    applied to it. With rollout_to_segment_end the same rollout continues to tau_src - segment and the state
    there is returned as x_end (the data-free trainer's next segment start, §3.4).
    """
    if teacher_ratio != 0:
        raise ValueError(f"plan_queries needs teacher_ratio == 0 (query states are known up front only then); "
                         f"got {teacher_ratio}. Use piid_segment for r > 0.")
    policy_d, tau_src, segment, w, gap_s, _ = _prepare(policy_detached, x, tau_src, segment, params, 0.0, generator)
    tau_a, tau = [], tau_src
    for gap in gap_s:  # successive max(tau - gap, 0), the same arithmetic as the sequential form
        tau = (tau - gap).clamp(min=0)
        tau_a.append(tau)
    tau_a = torch.stack(tau_a)  # (n_int, B)
    points = tau_a
    if rollout_to_segment_end:
        points = torch.cat([tau_a, (tau_src - segment).clamp(min=0)[None]])
    with torch.no_grad():
        states, _ = rollout_to_points(policy_d, x.detach(), tau_src, points, params.shift, params.total_substeps)
    n_int = params.num_intermediate
    return PiIDQueries(
        x_a=states[:n_int],
        tau_a=tau_a,
        sigma_a=warp(tau_a, params.shift),
        tau_b=tau_a.clone(),
        tau_window_end=(tau_a - w[None]).clamp(min=0),
        x_end=states[n_int] if rollout_to_segment_end else None,
    )


def segment_loss(policy, queries: PiIDQueries, u_teacher: torch.Tensor, params: PiIDParams):
    """The loss of a planned segment. u_teacher (n_int, B, C, H, W), the teacher's velocities at queries.x_a.
    Returns (loss, metrics); gradients flow only through `policy`."""
    if tuple(u_teacher.shape) != tuple(queries.x_a.shape):
        raise ValueError(f"segment_loss: u_teacher must have shape {tuple(queries.x_a.shape)} (n_int, B, C, H, W), "
                         f"got {tuple(u_teacher.shape)}")
    u_pred = torch.stack([
        window_average_velocity(policy, queries.x_a[i], queries.tau_a[i], queries.tau_window_end[i],
                                params.shift, params.total_substeps)
        for i in range(queries.x_a.shape[0])
    ])  # (n_int, B, C, H, W)
    return _loss(u_pred, u_teacher.detach().to(u_pred.dtype), params, 0.0)


def repeat_cond(cond: Any, n: int) -> Any:
    """cond with its batch rows repeated n times (row i*B + b is row b), matching x_a.reshape(n*B, ...)."""
    if cond is None or n == 1:
        return cond
    if isinstance(cond, dict):
        return {k: repeat_cond(v, n) for k, v in cond.items()}
    if isinstance(cond, torch.Tensor):
        return cond.repeat(n, *([1] * (cond.dim() - 1)))
    raise TypeError(f"conditioning values must be tensors or dicts of tensors, got {type(cond).__name__}")


def ask_teacher(teacher, queries: PiIDQueries, cond) -> torch.Tensor:
    """Every query of a planned segment in ONE teacher call: x (n_int*B, C, H, W), sigma (n_int*B,), cond rows
    repeated n_int times. Returns u_teacher (n_int, B, C, H, W) in the queries' dtype."""
    n, B = queries.x_a.shape[:2]
    x = queries.x_a.reshape(n * B, *queries.x_a.shape[2:])
    u = _call_teacher(teacher, x, queries.sigma_a.reshape(-1), repeat_cond(cond, n))
    return u.view(queries.x_a.shape)


def _call_teacher(teacher, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
    with torch.no_grad():
        u = teacher(x, sigma.to(x.dtype), cond)
    if tuple(u.shape) != tuple(x.shape):
        raise ValueError(f"teacher returned shape {tuple(u.shape)} for input {tuple(x.shape)}")
    return u.detach().to(x.dtype)


def _piid_sequential(policy, x_src, tau_src, segment, teacher, cond, params, r, generator):
    """§3.3 literally: alternate detached rollouts, teacher queries and teacher Euler steps.
    Returns (loss, metrics, x_last, tau_last, policy_d) with (x_last, tau_last) the state after the loop."""
    policy_d, tau, segment, w, gap_s, gap_t = _prepare(policy, x_src, tau_src, segment, params, r, generator)
    shift, total = params.shift, params.total_substeps
    B = x_src.shape[0]
    with torch.no_grad():
        x = x_src.detach().to(torch.float64 if x_src.dtype == torch.float64 else torch.float32)
    preds, targets = [], []
    for i in range(params.num_intermediate):
        tau_a = (tau - gap_s[i]).clamp(min=0)
        tau_b = (tau_a - gap_t[i]).clamp(min=0)
        with torch.no_grad():
            x_a = rollout(policy_d, x, tau, tau_a, shift, total)
        u_t = _call_teacher(teacher, x_a, warp(tau_a, shift), cond)
        preds.append(window_average_velocity(policy, x_a, tau_a, (tau_b - w).clamp(min=0), shift, total))
        targets.append(u_t)
        d_sigma = (warp(tau_b, shift) - warp(tau_a, shift)).to(x_a.dtype).reshape(B, 1, 1, 1)
        x, tau = x_a + u_t * d_sigma, tau_b  # teacher Euler step; a no-op when r = 0
    u_pred = torch.stack(preds)
    loss, metrics = _loss(u_pred, torch.stack(targets).to(u_pred.dtype), params, r)
    return loss, metrics, x, tau, policy_d


def piid_segment(policy, x_src, tau_src, segment, teacher, cond, params: PiIDParams, teacher_ratio: float = 0.0,
                 generator: torch.Generator | None = None):
    """One pi-ID segment, sequential reference (§3.3), any r in [0, 1]. The teacher is called once per query as
    teacher(x (B,C,H,W), sigma (B,), cond) -> u (B,C,H,W) under no_grad. Returns (loss, metrics)."""
    loss, metrics, *_ = _piid_sequential(policy, x_src, tau_src, segment, teacher, cond, params, teacher_ratio,
                                         generator)
    return loss, metrics


def data_free_iteration(make_policy, teacher, noise, cond, params: PiIDParams, teacher_ratio: float = 0.0,
                        generator: torch.Generator | None = None):
    """Data-free pi-ID (§3.4) as a generator: for each student step k it yields (S_k * L_k, metrics_k).

    The caller back-propagates each yielded loss before asking for the next (memory-friendly accumulation;
    the total is sum_k S_k L_k). make_policy(x_src (B,C,H,W), sigma_src (B,)) runs the student and its head.
    The next segment starts from the detached, dropout-applied policy rolled out to tau - S_k (from the state
    after the segment's last query; with r = 0 that is the same continuous rollout).
    """
    taus, _ = step_grid(params.nfe, params.final_step_scale, params.shift)
    B, device = noise.shape[0], noise.device
    bounds = segment_bounds(params, B, device, generator)
    x = noise.detach().to(torch.float64 if noise.dtype == torch.float64 else torch.float32)
    for k in range(params.nfe):
        tau = bounds[k]
        seg_len = float(taus[k] - taus[k + 1])  # the grid's S_k weights the loss (the mean under jitter)
        segment = bounds[k] - bounds[k + 1]
        last = k == params.nfe - 1
        policy = make_policy(x, warp(tau, params.shift).to(x.dtype))
        if teacher_ratio == 0:
            queries = plan_queries(policy, x, tau, segment, params, 0.0, generator, rollout_to_segment_end=not last)
            loss, metrics = segment_loss(policy, queries, ask_teacher(teacher, queries, cond), params)
            x_next = queries.x_end
        else:
            loss, metrics, x_last, tau_last, policy_d = _piid_sequential(
                policy, x, tau, segment, teacher, cond, params, teacher_ratio, generator)
            x_next = None
            if not last:
                with torch.no_grad():
                    x_next = rollout(policy_d, x_last, tau_last, (tau - segment).clamp(min=0), params.shift,
                                     params.total_substeps)
        metrics = dict(metrics, step=k, segment=seg_len, teacher_ratio=teacher_ratio)
        yield seg_len * loss, metrics
        x = x_next


@dataclass
class DataSegments:
    """The data-based trainer's per-sample inputs (§3.1), one row per sample of the batch."""

    x0: torch.Tensor  # (B, C, H, W) data latents
    tau_src: torch.Tensor  # (B,) float64 segment starts, drawn with probability = segment length
    segment: torch.Tensor  # (B,) float64 raw segment lengths


def data_x_src(x0: torch.Tensor, noise: torch.Tensor, sigma_src: torch.Tensor) -> torch.Tensor:
    """x_src = (1 - sigma_src) x0 + sigma_src eps (§3.1), per-sample sigma_src (B,); float32 (or float64)."""
    dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
    s = sigma_src.to(device=noise.device, dtype=dtype).reshape(-1, *([1] * (noise.dim() - 1)))
    return (1 - s) * x0.to(device=noise.device, dtype=dtype) + s * noise.to(dtype)


def data_iteration(make_policy, teacher, noise: torch.Tensor, data: DataSegments, cond, params: PiIDParams,
                   teacher_ratio: float = 0.0, generator: torch.Generator | None = None):
    """Data-based pi-ID (§3.1 + §3.3) with the shape of `data_free_iteration`: yields ONE (L, metrics).

    Each sample trains on its own segment [tau_src - S, tau_src] from x_src = (1 - sigma_src) x0 + sigma_src eps.
    make_policy(x_src (B,C,H,W), sigma_src (B,)) runs the student once. The loss is not weighted by S (§3.5).
    """
    B, device = noise.shape[0], noise.device
    if tuple(data.x0.shape) != tuple(noise.shape):
        raise ValueError(f"data latents have shape {tuple(data.x0.shape)}, the student's noise {tuple(noise.shape)} "
                         "(latent shards made for another model.latent_channels / latent_size?)")
    tau_src = as_batch(data.tau_src, B, device)
    segment = as_batch(data.segment, B, device)
    sigma_src = warp(tau_src, params.shift)
    x_src = data_x_src(data.x0, noise, sigma_src)
    policy = make_policy(x_src, sigma_src.to(x_src.dtype))
    if teacher_ratio == 0:
        queries = plan_queries(policy, x_src, tau_src, segment, params, 0.0, generator)
        loss, metrics = segment_loss(policy, queries, ask_teacher(teacher, queries, cond), params)
    else:
        loss, metrics, *_ = _piid_sequential(policy, x_src, tau_src, segment, teacher, cond, params,
                                             teacher_ratio, generator)
    metrics = dict(metrics, step=0, segment=float(segment.mean()), tau_src_mean=float(tau_src.mean()),
                   teacher_ratio=teacher_ratio)
    yield loss, metrics
