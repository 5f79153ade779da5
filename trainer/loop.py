"""The per-rank training loop of pi-ID, top to bottom: data-free (PIFLOW.md §3.4) or data-based (§3.1).

It receives everything from outside (the engine, the student's `make_policy`, the teacher callable, the batch
iterator, hooks), so the same loop runs in-process, under torchrun or under Ray Train. No ray import here.
"""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Any, Callable, Iterator, Optional

import torch
from tqdm.auto import tqdm

from models.piid import DataSegments, PiIDParams, data_free_iteration, data_iteration, teacher_ratio
from models.sample_rng import SampleRNG
from trainer.config import Config

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps, or non-finite weights at a checkpoint: the run stops; the newest
    valid checkpoint (never written from non-finite weights) is where to resume from."""


# make_policy(x_src (B,C,H,W), sigma_src (B,), cond) -> GMPolicy | DXPolicy (one student forward)
MakePolicy = Callable[[torch.Tensor, torch.Tensor, Any], Any]
# teacher(x_t (B,C,H,W), sigma (B,), cond) -> u (B,C,H,W) float32
TeacherFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def piid_params(cfg: Config) -> PiIDParams:
    d = cfg.distill
    return PiIDParams(nfe=d.nfe, final_step_scale=d.final_step_scale, shift=d.shift,
                      total_substeps=d.total_substeps, num_intermediate=d.num_intermediate,
                      window_substeps=d.window_substeps, loss_scale=d.loss_scale,
                      dropout=cfg.policy.dropout if cfg.policy.type == "gm" else 0.0,
                      boundary_jitter=d.boundary_jitter)


class _Timer:
    """Accumulates wall time per phase inside one iteration."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return timed


def _policy_stats(policy) -> dict[str, float]:
    """Cheap statistics of a student policy (GM: mean u-space log-std and mean largest component weight)."""
    stats = {}
    if hasattr(policy, "logstd"):
        stats["logstd_mean"] = float(policy.logstd.detach().mean())
    if hasattr(policy, "logweights"):
        stats["weight_max_mean"] = float(policy.logweights.detach().exp().amax(dim=1).mean())
    return stats


def _data_segments(cfg: Config, extra: list) -> Optional[DataSegments]:
    """The batch's DataSegments (data-based) or None (data-free); a mismatch with the config is a bug upstream."""
    data = extra[0] if extra else None
    if cfg.distill.data_free and data is not None:
        raise ValueError("distill.data_free is true but the batches carry data latents")
    if not cfg.distill.data_free and not isinstance(data, DataSegments):
        raise ValueError("distill.data_free: false needs batches with data latents (latent shards in data.shards, "
                         "made by `piflow shards latents`)")
    return data


def micro_batches(batch: int, micro: int) -> list[slice]:
    """Row slices of a local batch of `batch` samples in micro-batches of at most `micro` (0 = one slice)."""
    micro = micro or batch
    return [slice(i, min(i + micro, batch)) for i in range(0, batch, micro)]


def slice_rows(cond: Any, rows: slice) -> Any:
    """Rows of a conditioning dict (tensors with the batch first), or None."""
    if cond is None:
        return None
    return {k: slice_rows(v, rows) if isinstance(v, dict) else v[rows] for k, v in cond.items()}


def _slice_data(data: Optional[DataSegments], rows: slice) -> Optional[DataSegments]:
    return None if data is None else DataSegments(data.x0[rows], data.tau_src[rows], data.segment[rows])


def _slice_rng(gen: Any, rows: slice, batch: int) -> Any:
    """A micro-batch's random streams: per-sample streams (SampleRNG) are cut by rows, so a sample draws the
    same numbers in any micro-batch; one plain generator is shared (then the draws follow the split)."""
    if isinstance(gen, SampleRNG) and (rows.start, rows.stop) != (0, batch):
        return gen[rows]
    return gen


class CountedTeacher:
    """The loop's teacher: counts calls (a remote teacher's `submit` included) and forwards everything else."""

    def __init__(self, teacher: Any):
        self.teacher, self.calls = teacher, 0
        if hasattr(teacher, "submit"):
            self.submit = self._submit

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        self.calls += 1
        return self.teacher(x, sigma, cond)

    def _submit(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> Any:
        self.calls += 1
        return self.teacher.submit(x, sigma, cond)


def _iteration(cfg: Config, iteration, policy_of, teacher, timer: "_Timer", noise, cond, data, params, r, gen):
    """One micro-batch's pi-ID generator: data-based, the sequential data-free one, or `iteration`."""
    if data is not None:  # one segment per sample from a noised data latent
        return data_iteration(policy_of, timer.wrap("teacher_wait", teacher), noise, data, cond, params,
                              teacher_ratio=r, generator=gen)
    if iteration is None:
        return data_free_iteration(policy_of, timer.wrap("teacher_wait", teacher), noise, cond, params,
                                   teacher_ratio=r, generator=gen)
    # it gets the raw teacher (to submit requests) and adds its own "teacher_wait" seconds
    return iteration(policy_of, teacher, noise, cond, params, teacher_ratio=r, generator=gen, seconds=timer.seconds)


def train_loop(
    cfg: Config,
    engine,
    make_policy: MakePolicy,
    teacher: TeacherFn,
    batches: Iterator[tuple],  # yields (noise (B,C,H,W), cond), plus DataSegments when data-based
    *,
    ema=None,  # trainer.ema.PowerEMA or None
    logger=None,  # trainer.metrics.MetricsLogger or None
    eval_hook: Optional[Callable[[int], dict[str, float]]] = None,  # run with the EMA weights applied
    checkpoint_hook: Optional[Callable[..., Optional[float]]] = None,  # (step, loss=) -> the stall in seconds
    start_step: int = 0,
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
    iteration: Optional[Callable] = None,  # replaces data_free_iteration, e.g. trainer.overlap.overlapped_iteration
    sample_rng: Optional[Callable[[int], Any]] = None,  # iteration -> per-sample random streams (models.sample_rng)
) -> int:
    """Run iterations start_step .. cfg.train.iters - 1. Returns the number of completed steps.

    Non-finite guard: a non-finite loss or teacher output on any rank, or a non-finite global grad norm, skips
    the optimiser step on every rank (the engine agrees) and the EMA update; it is counted
    (`nonfinite_skipped`) and warned about; `train.max_nonfinite_steps` consecutive skips stop the run.
    pi-ID's random draws come from `sample_rng(it)` when given (keyed by global sample index: the same
    numbers with any world size or micro-batch split), else from `generator`.

    `train.micro_batch_size` m bounds the per-forward batch: the local batch runs as micro-batches of m samples
    (each a whole pi-ID iteration, its backwards accumulating), one optimiser step per iteration."""
    params = piid_params(cfg)
    counted = CountedTeacher(teacher)
    consecutive = 0
    stall: Optional[float] = None  # seconds the last checkpoint held training, logged with the next step
    iters = cfg.train.iters
    bar = tqdm(range(start_step, iters), initial=start_step, total=iters, desc=f"pi-ID {cfg.distill.nfe}-NFE",
               disable=not progress, mininterval=1.0)
    for it in bar:
        step = it + 1  # completed optimiser steps after this iteration
        if hasattr(teacher, "at_step"):  # trainer/fault_injection.py (soaks, tests): NaN at chosen steps
            teacher.at_step(step)
        timer, stats = _Timer(), {}
        t_start = time.perf_counter()

        noise, cond, *data = timer.wrap("data_wait", next)(batches)
        data = _data_segments(cfg, data)
        student_fwd = timer.wrap("student_fwd", make_policy)
        r = teacher_ratio(it, cfg.distill.teacher_ratio_decay_iters)
        gen = sample_rng(it) if sample_rng is not None else generator
        record: dict[str, Any] = {"teacher_ratio": r}
        total_loss, nonfinite = 0.0, []
        forwards0 = getattr(teacher, "forwards", None)
        counted.calls = 0
        B = noise.shape[0]
        for rows in micro_batches(B, cfg.train.micro_batch_size):
            # each micro-batch's losses are means over its rows: weighted by its share of the local batch they
            # sum to the unsplit step's loss, and so do the gradients its backwards accumulate
            share = (rows.stop - rows.start) / B
            mcond = slice_rows(cond, rows)

            def policy_of(x_src, sigma_src, mcond=mcond):
                policy = student_fwd(x_src, sigma_src, mcond)
                stats.update(_policy_stats(policy))  # the last segment's stats are kept
                return policy

            segments = _iteration(cfg, iteration, policy_of, counted, timer, noise[rows], mcond,
                                  _slice_data(data, rows), params, r, _slice_rng(gen, rows, B))
            for weighted_loss, m in segments:
                # always: ZeRO-3 backwards are collective
                timer.wrap("backward", engine.backward)(weighted_loss * share)
                k = int(m["step"])
                for name in ("loss", "mse"):
                    record[f"{name}/seg{k}"] = record.get(f"{name}/seg{k}", 0.0) + share * float(m[name])
                total_loss += share * float(weighted_loss.detach())
                if not math.isfinite(float(m["u_teacher_rms"])) and "teacher" not in nonfinite:
                    nonfinite.append("teacher")
        record["teacher/calls"] = counted.calls  # r = 0: one per segment and micro-batch (all n_int queries)
        if forwards0 is not None:
            record["teacher/forwards"] = teacher.forwards - forwards0  # network forwards of a local teacher
        if not math.isfinite(total_loss):
            nonfinite.append("loss")
        out = timer.wrap("optimizer", engine.step)(nonfinite)
        skipped, reasons = out.pop("skipped"), out.pop("nonfinite")
        record.update(out)
        record["nonfinite_skipped"] = engine.skipped_steps  # cumulative over the run (checkpointed)
        if skipped:
            consecutive += 1
            log.warning("step %d: non-finite %s (on this or another rank); optimizer step and EMA update "
                        "skipped (%d in a row, limit train.max_nonfinite_steps=%d)", step, " and ".join(reasons),
                        consecutive, cfg.train.max_nonfinite_steps)
            if consecutive >= cfg.train.max_nonfinite_steps:
                if logger is not None:
                    logger.log(step, {**record, "loss": total_loss})
                raise NonFiniteError(f"step {step}: {consecutive} consecutive steps with non-finite "
                                     f"{' and '.join(reasons)} (train.max_nonfinite_steps="
                                     f"{cfg.train.max_nonfinite_steps}); the weights were not updated by them and "
                                     f"the newest valid checkpoint is intact: inspect the data and teacher, then "
                                     f"resume or lower optim.lr")
        else:
            consecutive = 0
            if ema is not None:
                record["ema_beta"] = timer.wrap("ema", ema.update)(it)

        record["loss"] = total_loss  # sum_k S_k L_k data-free, L data-based (§3.5)
        record.update(stats)
        t_total = time.perf_counter() - t_start
        # "rollout" is what remains: the network-free policy rollouts and the loss arithmetic.
        record["time/rollout_other"] = t_total - sum(timer.seconds.values())
        record.update({f"time/{name}": s for name, s in timer.seconds.items()})
        record["time/step"] = t_total
        record["time/teacher_wait_frac"] = timer.seconds["teacher_wait"] / max(t_total, 1e-12)

        if stall is not None:
            record["checkpoint_stall_s"], stall = stall, None  # the previous step's checkpoint held training
        if eval_hook is not None and cfg.eval.every and (step % cfg.eval.every == 0 or step == iters):
            with ema.applied() if ema is not None else nullcontext():
                record.update({f"eval/{k}": v for k, v in eval_hook(step).items()})
        # log before checkpointing: the hook puts every record up to `step` on storage before the checkpoint
        # can commit, so a resume from it never lacks the step's own record (metrics, consumed keys)
        if logger is not None:
            logger.log(step, record)
        if checkpoint_hook is not None and (step % cfg.train.ckpt_every == 0 or step == iters):
            # a skipped step records a non-finite loss on every rank (rank 0's own loss may have been finite)
            stall = float(checkpoint_hook(step, loss=math.nan if skipped else total_loss) or 0.0)
        bar.set_postfix(loss=f"{total_loss:.4g}", refresh=False)
    return iters

