"""Data-free pi-ID with the teacher's work overlapped with the student's (DESIGN.md §4, PIFLOW.md §3.4).

With r = 0 every teacher query of a segment is known right after the detached rollout (`plan_queries`), so
the n_int queries go out as ONE request, and while the teacher computes segment k's targets the student
already runs segment k+1's forward (the weights do not change inside an iteration: the gradients of all
segments accumulate into one optimiser step). Order on the student:

    fwd_0 plan_0 send_0 | fwd_1 plan_1 send_1 | wait_0 loss_0 (yield: caller runs bwd_0) | fwd_2 ... | wait_last

It yields exactly what `models.piid.data_free_iteration` yields, `(S_k * L_k, metrics_k)` in order k = 0..nfe-1,
drawing the same random numbers in the same order, so the losses equal the sequential form's.

The teacher is any object with `submit(x (N,C,H,W), sigma (N,), cond) -> future` (`future.result()` -> u
(N,C,H,W) float32) where `cond` has B rows and N = n * B (the rows repeat n times, the server expands them:
prompt embeddings cross the network once per batch), or a plain callable `teacher(x, sigma, cond)` (then the
call is made at once: no overlap, same numbers).
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable, Optional

import torch

from models.piid import (PiIDParams, data_free_iteration, plan_queries, repeat_cond, segment_bounds,
                         segment_loss)
from models.timesteps import step_grid, warp


class Done:
    """An already computed result with the future interface."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def result(self) -> torch.Tensor:
        return self.value


def submit_to(teacher: Any) -> Callable[[torch.Tensor, torch.Tensor, Any], Any]:
    """The `submit` of a remote teacher client, or an immediate call of a local teacher callable."""
    if hasattr(teacher, "submit"):
        return teacher.submit

    def call(x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> Done:
        n = x.shape[0] // _rows(cond, x.shape[0])
        with torch.no_grad():
            return Done(teacher(x, sigma, repeat_cond(cond, n)))

    return call


def _timed_call(teacher: Any, seconds: dict[str, float]) -> Callable:
    submit = submit_to(teacher)

    def call(x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return submit(x, sigma, cond).result()
        finally:
            seconds["teacher_wait"] += time.perf_counter() - t0

    return call


def _rows(cond: Any, default: int) -> int:
    if isinstance(cond, dict) and cond:
        return _rows(next(iter(cond.values())), default)
    if isinstance(cond, torch.Tensor):
        return cond.shape[0]
    return default


def overlapped_iteration(make_policy, teacher, noise: torch.Tensor, cond: Any, params: PiIDParams,
                         teacher_ratio: float = 0.0, generator: Optional[torch.Generator] = None,
                         seconds: Optional[dict[str, float]] = None):
    """Data-free pi-ID with the teacher overlapped (see the module docstring); the loop's `iteration` hook.

    make_policy(x_src (B,C,H,W), sigma_src (B,)) runs the student. With teacher_ratio > 0 (FLUX's early
    trajectory mixing, where the next query depends on the teacher's Euler step) it falls back to the
    sequential `data_free_iteration`. `seconds` (optional) accumulates "teacher_wait" (blocked on a result)."""
    seconds = seconds if seconds is not None else defaultdict(float)
    if teacher_ratio != 0:
        yield from data_free_iteration(make_policy, _timed_call(teacher, seconds), noise, cond, params,
                                       teacher_ratio=teacher_ratio, generator=generator)
        return
    submit = submit_to(teacher)
    taus, _ = step_grid(params.nfe, params.final_step_scale, params.shift)
    B, device = noise.shape[0], noise.device
    bounds = segment_bounds(params, B, device, generator)
    x = noise.detach().to(torch.float64 if noise.dtype == torch.float64 else torch.float32)
    n_int = params.num_intermediate
    pending = None

    def finish(item) -> tuple[torch.Tensor, dict]:
        k, seg_len, policy, queries, future = item
        t0 = time.perf_counter()
        u = future.result()  # (n_int*B, C, H, W)
        seconds["teacher_wait"] += time.perf_counter() - t0
        u_teacher = u.to(device=queries.x_a.device, dtype=queries.x_a.dtype).view(queries.x_a.shape)
        loss, metrics = segment_loss(policy, queries, u_teacher, params)
        return seg_len * loss, dict(metrics, step=k, segment=seg_len, teacher_ratio=0.0)

    for k in range(params.nfe):
        tau = bounds[k]
        seg_len = float(taus[k] - taus[k + 1])
        last = k == params.nfe - 1
        policy = make_policy(x, warp(tau, params.shift).to(x.dtype))
        queries = plan_queries(policy, x, tau, bounds[k] - bounds[k + 1], params, 0.0, generator,
                               rollout_to_segment_end=not last)
        x_a = queries.x_a.reshape(n_int * B, *queries.x_a.shape[2:])  # (n_int*B, C, H, W)
        future = submit(x_a, queries.sigma_a.reshape(-1).to(x_a.dtype), cond)
        if pending is not None:
            yield finish(pending)  # the caller's backward of segment k-1 runs while the teacher works on k
        pending = (k, seg_len, policy, queries, future)
        x = queries.x_end
    yield finish(pending)
