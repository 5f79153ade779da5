"""Fresh start or exact resume of a run, and the per-step save hook (the loop calls these three).

    info = prepare_output(cfg, rank, barrier)              # every rank, before building data iterators
    state = resume_state(cfg, manager, info, engine, ema, module, generators)   # None on a fresh start
    ... stall_s = save_state(cfg, manager, step, engine, ema, module, data_state, generators, wandb_run_id)

Rules (DESIGN.md §6, issue 6):
- `run.output` with a valid checkpoint: resume from the newest valid manifest. Checkpoint dirs newer than
  it (partial uploads, or invalid ones) are deleted first, so the resumed timeline never meets their files.
- `run.output` used (checkpoints, rollouts or metrics.jsonl) but nothing valid to resume: an error that
  asks for `--force` (a crash before the first checkpoint then needs `--force`, which is what it means).
- `run.force` (`piflow train --force`): rank 0 deletes checkpoints/, rollouts/, export/ and metrics.jsonl;
  the run starts at step 0 with a new wandb run.
- A changed config on resume is a WARNING naming the changed keys, not an error: extending `train.iters`
  or changing `eval.every` is legitimate, and an exact resume is only promised for an unchanged config.

The client state restores this rank's python/numpy/torch RNGs and the named generators, so the steps after
a resume draw the same numbers as an uninterrupted run.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from data_pipeline import storage
from trainer.checkpoint.store import (CheckpointError, CheckpointInfo, CheckpointManager, capture_rng, checkpoints_url,
                                latest_valid, list_steps, restore_rng, step_dirname)
from trainer.config import Config

log = logging.getLogger(__name__)

# Removed by --force (everything a run writes under run.output except config.yaml, which is rewritten).
_RUN_ENTRIES = ("checkpoints", "rollouts", "export", "metrics.jsonl", "data_keys", "rank_summaries", "wandb.json")
# Differences that never matter for resuming.
_IGNORED_KEYS = {"run.force", "run.scratch"}  # run.scratch: per node, issue 11


class ResumeError(RuntimeError):
    pass


@dataclass(frozen=True)
class ResumeState:
    step: int  # optimiser steps done; the loop continues with this step index
    data_state: Any  # what the loop passed as `data_state` when saving (the data cursor)
    wandb_run_id: str  # "" if none was recorded
    checkpoint_url: str


def make_manager(cfg: Config, rank: int, world_size: int, barrier: Optional[Callable[[], None]] = None,
                 any_rank: Optional[Callable[[bool], bool]] = None) -> CheckpointManager:
    return CheckpointManager(cfg.run.output, rank=rank, world_size=world_size, keep_last=cfg.train.ckpt_keep_last,
                             keep_every=cfg.train.ckpt_keep_every, queue_size=cfg.train.upload_queue,
                             barrier=barrier, part_timeout_s=cfg.train.ckpt_part_timeout_s,
                             max_failed_uploads=cfg.train.max_failed_uploads, any_rank=any_rank,
                             scratch=cfg.run.scratch)


def output_is_used(run_output: str) -> bool:
    names = set(storage.listdir(run_output))
    if "metrics.jsonl" in names:
        return True
    return any(storage.listdir(storage.join(run_output, d)) for d in ("checkpoints", "rollouts") if d in names)


def prepare_output(cfg: Config, rank: int = 0, barrier: Optional[Callable[[], None]] = None,
                   decided: bool = False) -> Optional[CheckpointInfo]:
    """Decide fresh start vs resume (same answer on every rank) and clean run.output accordingly (rank 0).
    Returns the checkpoint to resume from, or None for a fresh start. Call on every rank.

    `decided=True` is for ranks whose launcher already made that decision (and applied --force) once for the
    whole run: a group restarted by Ray Train then resumes from the newest valid checkpoint, or restarts from
    step 0 when it failed before the first one, instead of tripping over its own partial output."""
    sync = barrier or (lambda: None)
    out = cfg.run.output
    force = cfg.run.force and not decided
    info = None if force else latest_valid(out)
    if info is None and not force and not decided and output_is_used(out):
        raise ResumeError(f"run.output {out} holds a previous run but no valid checkpoint to resume "
                          f"(none under {checkpoints_url(out)} has a complete MANIFEST.json); pass --force to "
                          f"start fresh (this deletes its checkpoints, rollouts, export and metrics.jsonl)")
    sync()  # every rank has read the storage state before rank 0 changes it
    if rank == 0:
        if force:
            for entry in _RUN_ENTRIES:
                url = storage.join(out, entry)
                if storage.exists(url):
                    log.warning("--force: removing %s", url)
                    storage.remove(url, recursive=True)
        elif info is not None:
            for step in list_steps(out):
                if step > info.step:  # partial or invalid: from a timeline the resume abandons
                    url = storage.join(checkpoints_url(out), step_dirname(step))
                    log.warning("removing %s (newer than the resumed checkpoint step %d and not valid)",
                                url, info.step)
                    storage.remove(url, recursive=True)
        storage.makedirs(out)
    sync()
    return info


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for k in sorted(set(old) | set(new)):
        path = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)  # a key only on one side differs from None on the other
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_diff(a, b, path + ".")
        elif a != b and path not in _IGNORED_KEYS:
            keys.append(path)
    return keys


def fetch_with_fallback(cfg: Config, manager: CheckpointManager, info: Optional[CheckpointInfo],
                        needed: Optional[list] = None):
    """Download and check `info` on every rank; when any rank's files fail their checks (sha256, size,
    malformed rank state), every rank falls back to the next older valid checkpoint, with a warning naming
    the file. Rank 0 removes the rejected checkpoint (the resumed timeline overwrites its step anyway).
    `needed`: this rank's engine slots (only the old ranks holding them are downloaded on a resharding
    resume). Returns (info, fetched) or (None, None) when there was nothing to resume."""
    while info is not None:
        try:
            fetched, err = manager.fetch(info, needed), None
        except CheckpointError as e:
            fetched, err = None, e
        if err is not None:
            log.warning("checkpoint %s failed its checks on rank %d: %s; falling back to an older one",
                        info.url, manager.rank, err)
        if not manager.any_rank(err is not None):
            return info, fetched
        older = latest_valid(cfg.run.output, below=info.step)
        if manager.barrier is not None:
            manager.barrier()  # every rank is done reading the rejected checkpoint
        if manager.rank == 0:
            log.warning("removing rejected checkpoint %s; resuming from %s", info.url,
                        older.url if older else "nothing")
            storage.remove(info.url, recursive=True)
        if manager.barrier is not None:
            manager.barrier()
        if older is None:
            raise ResumeError(f"every checkpoint under {checkpoints_url(cfg.run.output)} failed its checks "
                              f"(the last: {info.url}: {err or 'on another rank'}); pass --force to start fresh")
        info = older
    return None, None


def resume_state(cfg: Config, manager: CheckpointManager, info: Optional[CheckpointInfo], engine, ema=None,
                 module: Optional[torch.nn.Module] = None,
                 generators: Optional[dict[str, torch.Generator]] = None) -> Optional[ResumeState]:
    """Restore engine, EMA and this rank's RNGs from `info` (from `prepare_output`), or from an older valid
    checkpoint when `info` fails its checks on any rank; None for a fresh start. The checkpoint may come from
    another world size (resharded on load); the RNGs then come from rank `rank % W`."""
    info, fetched = fetch_with_fallback(cfg, manager, info, engine.slots() if hasattr(engine, "slots") else None)
    if info is None:
        return None
    client = manager.apply(fetched, engine, ema)
    restore_rng(client["rng"], generators)
    old_cfg = info.manifest.get("meta", {}).get("config")
    if old_cfg is not None:
        changed = [k for k in config_diff(old_cfg, cfg.to_dict()) if k != "cluster.student.workers"]
        if changed:
            log.warning("resuming %s with a changed config (%s); the run continues, but it is not an exact "
                        "continuation of the original one", info.url, ", ".join(changed))
    if info.manifest["world_size"] != manager.world_size:
        log.warning("resuming %s (written by %d ranks) on %d ranks: engine, optimizer and EMA partitions resharded",
                    info.url, info.manifest["world_size"], manager.world_size)
    log.info("resumed from %s (step %d)", info.url, info.step)
    return ResumeState(step=int(client["step"]), data_state=client.get("data"),
                       wandb_run_id=str(client.get("wandb_run_id", "")), checkpoint_url=info.url)


def save_state(cfg: Config, manager: CheckpointManager, step: int, engine, ema=None,
               module: Optional[torch.nn.Module] = None, data_state: Any = None,
               generators: Optional[dict[str, torch.Generator]] = None, wandb_run_id: str = "",
               loss: Optional[float] = None) -> float:
    """Checkpoint after `step` optimiser steps. Returns the seconds training waited (checkpoint_stall_s).
    `data_state` must be the cursor of the batches CONSUMED so far (not of read-ahead); `loss` (the step's
    loss) is recorded in the manifest: retention always keeps the newest checkpoint whose loss was finite.
    Refuses (NonFiniteError, on every rank) to write non-finite weights or EMA."""
    from trainer.loop import NonFiniteError

    failing = manager.consecutive_failures >= manager.max_failed_uploads
    if engine.any_rank(failing):  # every rank stops together, not just the one whose uploads fail
        manager.check_uploads()
        raise CheckpointError(f"step {step}: another rank's last {manager.max_failed_uploads} checkpoint uploads "
                              f"failed (its log names the cause); stopping (train.max_failed_uploads)")
    ema_bad = ema is not None and any(not bool(torch.isfinite(s).all()) for s in ema.shadow)
    if not engine.weights_finite() or engine.any_rank(ema_bad):
        raise NonFiniteError(f"step {step}: the weights or the EMA hold non-finite values; refusing to write a "
                             f"checkpoint (the newest valid one under {checkpoints_url(cfg.run.output)} stays)")
    client = {"rng": capture_rng(generators), "data": data_state, "wandb_run_id": wandb_run_id,
              "config_hash": cfg.hash()}
    finite = loss is None or math.isfinite(loss)
    meta = {"config": cfg.to_dict(), "config_hash": cfg.hash(), "wandb_run_id": wandb_run_id,
            "loss": loss if loss is not None and finite else None, "loss_finite": finite}
    return manager.save(step, engine, ema, client, module=module, meta=meta if manager.rank == 0 else None)
