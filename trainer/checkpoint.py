"""Checkpoints on object storage (DESIGN.md §6): per-rank files, a manifest written last, uploads off the
training thread, retention.

Layout under `run.output` (a local dir or `s3://`; all access through `data_pipeline.storage`):

    checkpoints/step_00001000/
      rank_00000/engine/...      `save_engine`: torch engine.pt, or this rank's ZeRO-3 shards (zero/...)
      rank_00000/ema.pt          this rank's EMA shadow (its ZeRO partition) + parameter names and full shapes
      rank_00000/client.pt       step, data cursor, this rank's RNG states, wandb run id, config hash
      parts/rank_00000.json      this rank's file list (size, sha256), written after its files are uploaded
      MANIFEST.json              rank 0, LAST, once every rank's part is there: a checkpoint without it does
                                 not exist (resume and retention ignore it; cleanup removes it)

A save writes the rank's files into a local staging dir on the training thread (the snapshot must be taken
at the step), then hands them to a worker thread through a bounded queue; training waits only when the
queue is full, and `save` returns that wait (the `checkpoint_stall_s` metric). Rank 0's worker, after its
own upload, polls storage for every rank's part (no collective on a side thread), writes the manifest and
applies retention. A checkpoint goes to a new directory and retention deletes only after a newer manifest
exists, so a failed or killed upload never touches the previous checkpoint. Every storage call retries
transient errors (storage.py); on top, a whole rank upload is retried `UPLOAD_ATTEMPTS` times.

Files are `torch.save`d and read back with `weights_only=True`: client state (the data cursor included)
must hold only tensors, numbers, strings and containers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import random
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch

from data_pipeline import storage

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
FORMAT_VERSION = 1
UPLOAD_ATTEMPTS = 5  # whole-rank attempts on top of storage.py's per-call retries; a retry skips done files
_STEP_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the checkpoint and the file."""


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def rank_dirname(rank: int) -> str:
    return f"rank_{rank:05d}"


def checkpoints_url(run_output: str) -> str:
    return storage.join(run_output, "checkpoints")


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- RNG state
def capture_rng(generators: Optional[dict[str, torch.Generator]] = None) -> dict[str, Any]:
    """This rank's RNG states: python, numpy (legacy global), torch CPU (+ CUDA), and named generators."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng(state: dict[str, Any], generators: Optional[dict[str, torch.Generator]] = None) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state["generators"]
    for name, g in (generators or {}).items():
        if name not in saved:
            raise CheckpointError(f"checkpoint has no RNG state for generator {name!r} (has {sorted(saved)})")
        g.set_state(saved[name])


# --------------------------------------------------------------------------------------------- engine
ZERO_TAG = "zero"  # DeepSpeed's tag dir inside rank_R/engine/


def save_engine(engine, local_dir: str) -> None:
    """Write this rank's engine state (weights, optimiser, step) into `local_dir` (one mapping per engine
    type, here: the engine module keeps no storage knowledge). Every rank must call it (ZeRO barriers)."""
    from trainer.engine import DeepSpeedEngine, TorchEngine

    os.makedirs(local_dir, exist_ok=True)
    if isinstance(engine, TorchEngine):
        torch.save(engine.state_dict(), os.path.join(local_dir, "engine.pt"))
    elif isinstance(engine, DeepSpeedEngine):
        # each rank stages into its own dir; DeepSpeed creates the tag dir on rank 0 only
        os.makedirs(os.path.join(local_dir, ZERO_TAG), exist_ok=True)
        engine.save_checkpoint(local_dir, ZERO_TAG)  # this rank's ZeRO shards + optimiser partition
    else:
        raise TypeError(f"save_engine: unsupported engine {type(engine).__name__}")


def load_engine(engine, local_dir: str) -> None:
    from trainer.engine import DeepSpeedEngine, TorchEngine

    if isinstance(engine, TorchEngine):
        engine.load_state_dict(torch.load(os.path.join(local_dir, "engine.pt"), weights_only=True))
    elif isinstance(engine, DeepSpeedEngine):
        engine.load_checkpoint(local_dir, ZERO_TAG)
    else:
        raise TypeError(f"load_engine: unsupported engine {type(engine).__name__}")


# ------------------------------------------------------------------------------------------------ EMA
def ema_payload(ema, module: Optional[torch.nn.Module]) -> dict[str, Any]:
    """EMA state plus each tracked parameter's name and full shape, so export can reassemble ZeRO-3
    partitions (flat, padded, one per rank) without a live engine."""
    names = {id(p): n for n, p in module.named_parameters()} if module is not None else {}
    return {
        "state": ema.state_dict(),
        "names": [names.get(id(p), f"param_{i}") for i, p in enumerate(ema.params)],
        "shapes": [list(getattr(p, "ds_shape", p.shape)) for p in ema.params],
    }


# ------------------------------------------------------------------------------------------ discovery
@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    url: str  # .../checkpoints/step_00001000
    manifest: dict[str, Any]


def list_steps(run_output: str) -> list[int]:
    """Steps of every checkpoint directory (valid or not), ascending."""
    steps = []
    for name in storage.listdir(checkpoints_url(run_output)):
        m = _STEP_RE.match(name)
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def read_manifest(ckpt_url: str) -> Optional[dict[str, Any]]:
    url = storage.join(ckpt_url, MANIFEST)
    try:
        return json.loads(storage.get_bytes(url).decode("utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        log.warning("%s: unreadable manifest (%s); treating the checkpoint as partial", url, e)
        return None


def verify(ckpt_url: str, manifest: dict[str, Any], mode: Literal["size", "sha256"] = "size") -> Optional[str]:
    """None when every manifest file exists with its size (and sha256 with mode='sha256'); else the reason."""
    for rel, meta in manifest["files"].items():
        url = storage.join(ckpt_url, *rel.split("/"))
        try:
            size = _size(url)
        except FileNotFoundError:
            return f"{rel}: missing"
        if size != meta["size"]:
            return f"{rel}: size {size}, manifest says {meta['size']}"
        if mode == "sha256":
            digest = hashlib.sha256(storage.get_bytes(url)).hexdigest()
            if digest != meta["sha256"]:
                return f"{rel}: sha256 {digest[:12]}..., manifest says {meta['sha256'][:12]}..."
    return None


def _size(url: str) -> int:
    return storage.size(url)


def latest_valid(run_output: str, verify_mode: Literal["size", "sha256"] = "size") -> Optional[CheckpointInfo]:
    """The newest checkpoint whose manifest exists and whose files match it; None if there is none.

    'size' (the resume default) compares sizes from a listing; each rank then checks the sha256 of the
    files it downloads (`CheckpointManager.load`). 'sha256' reads every file here (export, tests)."""
    for step in reversed(list_steps(run_output)):
        url = storage.join(checkpoints_url(run_output), step_dirname(step))
        manifest = read_manifest(url)
        if manifest is None:
            continue
        reason = verify(url, manifest, verify_mode)
        if reason is not None:
            log.warning("checkpoint %s is invalid (%s); trying an older one", url, reason)
            continue
        return CheckpointInfo(step, url, manifest)
    return None


def remove_partial(run_output: str, below: Optional[int] = None) -> list[int]:
    """Delete checkpoint dirs without a manifest (all, or only those with step < `below`). Returns their steps.

    Call it only when no upload of those steps can be in flight: at resume before training starts, or for
    steps older than one whose manifest is written (uploads are sequential per rank)."""
    removed = []
    for step in list_steps(run_output):
        if below is not None and step >= below:
            continue
        url = storage.join(checkpoints_url(run_output), step_dirname(step))
        if not storage.exists(storage.join(url, MANIFEST)):
            log.warning("removing partial checkpoint %s (no manifest)", url)
            storage.remove(url, recursive=True)
            removed.append(step)
    return removed


def retained_steps(valid_steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """Keep the last `keep_last` steps plus every step that is a multiple of `keep_every` (0 = off)."""
    keep = set(sorted(valid_steps)[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {s for s in valid_steps if s % keep_every == 0}
    return keep


# -------------------------------------------------------------------------------------------- manager
@dataclass
class _Job:
    step: int
    local_dir: str  # staging/step_N/rank_R
    meta: dict[str, Any]
    uploaded: dict[str, dict[str, Any]] = field(default_factory=dict)  # rel -> size/sha256, kept across retries


def default_staging_dir(run_output: str, rank: int, scratch: str = "") -> str:
    """`<run.scratch or the system temp dir>/piflow-staging/<run key>-r<rank>`: node-local (issue 11)."""
    key = hashlib.sha256(run_output.encode()).hexdigest()[:12]
    return os.path.join(scratch or tempfile.gettempdir(), "piflow-staging", f"{key}-r{rank}")


def staging_bytes_estimate(engine, ema=None) -> int:
    """Bytes a save of this rank stages, before the first one has been measured: its fp32 partition of the
    trained parameters x (weights + 2 Adam moments + EMA), plus 10% for metadata."""
    local = 0
    for p in getattr(engine, "params", []):
        if getattr(p, "requires_grad", True):
            local += (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel())
    return int(local * 4 * (3 + (ema is not None)) * 1.1)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


class CheckpointManager:
    """Saves and loads this rank's part of a checkpoint; rank 0 also writes the manifest and prunes.

    `barrier` (a callable, e.g. torch.distributed.barrier) is called only from the training thread, in
    `close()`, so every rank's uploads are finished before any process exits."""

    def __init__(self, run_output: str, rank: int = 0, world_size: int = 1, keep_last: int = 2,
                 keep_every: int = 0, queue_size: int = 2, barrier: Optional[Callable[[], None]] = None,
                 staging_dir: Optional[str] = None, part_timeout_s: float = 1800.0, scratch: str = ""):
        if keep_last < 1:
            raise ValueError(f"train.ckpt_keep_last must be >= 1, got {keep_last}")
        if queue_size < 1:
            raise ValueError(f"train.upload_queue must be >= 1, got {queue_size}")
        self.run_output = run_output
        self.root = checkpoints_url(run_output)
        self.rank, self.world_size = rank, world_size
        self.keep_last, self.keep_every = keep_last, keep_every
        self.barrier = barrier
        self.part_timeout_s = part_timeout_s
        self._own_staging = staging_dir is None
        # One staging dir per (run, rank), emptied on start: a killed process cannot leave copies piling up.
        self.staging = staging_dir or default_staging_dir(run_output, rank, scratch)
        self._staged_bytes = 0  # the size of this rank's last save: the free-space check's estimate
        if self._own_staging:
            shutil.rmtree(self.staging, ignore_errors=True)
            os.makedirs(self.staging)
        self._queue: queue.Queue[Optional[_Job]] = queue.Queue(maxsize=queue_size)
        self._worker: Optional[threading.Thread] = None
        self.failed_steps: list[int] = []  # uploads that failed after every retry (logged; close() raises)
        self.completed_steps: list[int] = []  # this rank's finished uploads (rank 0: manifests written)

    # ----------------------------------------------------------------------------------------- save
    def save(self, step: int, engine, ema=None, client_state: Optional[dict[str, Any]] = None,
             module: Optional[torch.nn.Module] = None, meta: Optional[dict[str, Any]] = None) -> float:
        """Snapshot this rank's state at `step` and queue its upload. Returns the seconds training waited
        for a free queue slot. `meta` (rank 0, JSON-able: config, config hash, wandb id) goes into the
        manifest."""
        from trainer.scratch import ensure_free

        local = os.path.join(self.staging, step_dirname(step), rank_dirname(self.rank))
        if os.path.exists(local):
            shutil.rmtree(local)
        ensure_free(self.staging, max(self._staged_bytes, staging_bytes_estimate(engine, ema)),
                    f"staging the step {step} checkpoint of rank {self.rank}")
        os.makedirs(local)
        save_engine(engine, os.path.join(local, "engine"))
        if ema is not None:
            torch.save(ema_payload(ema, module), os.path.join(local, "ema.pt"))
        torch.save({"step": step, **(client_state or {})}, os.path.join(local, "client.pt"))
        self._staged_bytes = _dir_bytes(local)
        self._ensure_worker()
        t0 = time.perf_counter()
        self._queue.put(_Job(step, local, dict(meta or {})))
        return time.perf_counter() - t0

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._run, name=f"ckpt-upload-r{self.rank}", daemon=True)
            self._worker.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._upload_with_retries(job)
            finally:
                self._queue.task_done()

    def _upload_with_retries(self, job: _Job) -> None:
        url = storage.join(self.root, step_dirname(job.step))
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                self._upload(job, url)
                if self.rank == 0:
                    self._finalize(job, url)
                self.completed_steps.append(job.step)
                shutil.rmtree(os.path.dirname(job.local_dir), ignore_errors=True)
                return
            except Exception as e:  # noqa: BLE001 - logged, retried, then recorded
                log.warning("checkpoint %s rank %d: upload attempt %d/%d failed: %s: %s",
                            url, self.rank, attempt, UPLOAD_ATTEMPTS, type(e).__name__, e)
                if attempt < UPLOAD_ATTEMPTS:
                    time.sleep(min(60.0, 2.0 ** attempt))
        log.error("checkpoint %s rank %d: giving up; the previous checkpoint stays the newest valid one",
                  url, self.rank)
        self.failed_steps.append(job.step)
        shutil.rmtree(os.path.dirname(job.local_dir), ignore_errors=True)

    def _upload(self, job: _Job, url: str) -> None:
        rank_dir = rank_dirname(self.rank)
        for dirpath, _, names in sorted(os.walk(job.local_dir)):
            for name in sorted(names):
                path = os.path.join(dirpath, name)
                rel = rank_dir + "/" + os.path.relpath(path, job.local_dir).replace(os.sep, "/")
                if rel in job.uploaded:
                    continue
                meta = {"size": os.path.getsize(path), "sha256": sha256_file(path)}
                storage.upload(path, storage.join(url, *rel.split("/")))
                job.uploaded[rel] = meta
        part = {"rank": self.rank, "step": job.step, "files": job.uploaded}
        storage.put_bytes(storage.join(url, "parts", f"{rank_dir}.json"), json.dumps(part).encode())

    def _finalize(self, job: _Job, url: str) -> None:
        """Rank 0: wait for every rank's part, write MANIFEST.json, prune."""
        parts = self._wait_for_parts(url)
        files: dict[str, dict[str, Any]] = {}
        for part in parts:
            files.update(part["files"])
        manifest = {"format": FORMAT_VERSION, "step": job.step, "world_size": self.world_size,
                    "created_unix": time.time(), "files": files, "meta": job.meta}
        storage.put_bytes(storage.join(url, MANIFEST), json.dumps(manifest, indent=1).encode())
        log.info("checkpoint %s complete (%d files)", url, len(files))
        self._prune(job.step)

    def _wait_for_parts(self, url: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.part_timeout_s
        delay = 0.05
        while True:
            parts = []
            for r in range(self.world_size):
                part_url = storage.join(url, "parts", f"{rank_dirname(r)}.json")
                try:
                    parts.append(json.loads(storage.get_bytes(part_url)))
                except FileNotFoundError:
                    break
            if len(parts) == self.world_size:
                return parts
            if time.monotonic() > deadline:
                raise CheckpointError(f"{url}: only {len(parts)}/{self.world_size} ranks uploaded their part "
                                      f"within {self.part_timeout_s:.0f}s")
            time.sleep(delay)
            delay = min(2.0, delay * 2)

    def _prune(self, newest: int) -> None:
        remove_partial(self.run_output, below=newest)
        valid = [s for s in list_steps(self.run_output)
                 if storage.exists(storage.join(self.root, step_dirname(s), MANIFEST))]
        keep = retained_steps(valid, self.keep_last, self.keep_every)
        for step in valid:
            if step not in keep:
                log.info("retention: removing checkpoint step %d", step)
                # the manifest goes first: a half-deleted checkpoint then reads as partial, never as valid
                storage.remove(storage.join(self.root, step_dirname(step), MANIFEST))
                storage.remove(storage.join(self.root, step_dirname(step)), recursive=True)

    # ---------------------------------------------------------------------------------------- flush
    def wait(self) -> None:
        """Block until every queued upload of this rank is done (or failed)."""
        if self._worker is not None:
            self._queue.join()

    def close(self) -> None:
        """Finish uploads, stop the worker, sync ranks (so rank 0's manifests are written before anyone
        exits), remove the staging dir. Raises CheckpointError if an upload failed for good."""
        if self._worker is not None and self._worker.is_alive():
            self._queue.put(None)
            self._worker.join()
        self._worker = None
        if self.barrier is not None:
            self.barrier()
        if self._own_staging:
            shutil.rmtree(self.staging, ignore_errors=True)
        if self.failed_steps:
            raise CheckpointError(f"rank {self.rank}: checkpoint uploads failed for steps {self.failed_steps} "
                                  f"under {self.root}")

    # ----------------------------------------------------------------------------------------- load
    def load(self, info: CheckpointInfo, engine, ema=None, module: Optional[torch.nn.Module] = None) -> dict:
        """Download this rank's files of `info` (checking each sha256 against the manifest), restore the
        engine and EMA, return the client state dict (step, cursor, rng, ...)."""
        manifest_world = info.manifest["world_size"]
        if manifest_world != self.world_size:
            raise CheckpointError(f"{info.url} was written by {manifest_world} ranks, this run has "
                                  f"{self.world_size}: ZeRO shards cannot be re-partitioned on resume")
        prefix = rank_dirname(self.rank) + "/"
        local = os.path.join(self.staging, "load", step_dirname(info.step), rank_dirname(self.rank))
        shutil.rmtree(local, ignore_errors=True)
        for rel, meta in sorted(info.manifest["files"].items()):
            if not rel.startswith(prefix):
                continue
            path = os.path.join(local, *rel[len(prefix):].split("/"))
            storage.download(storage.join(info.url, *rel.split("/")), path)
            digest = sha256_file(path)
            if digest != meta["sha256"] or os.path.getsize(path) != meta["size"]:
                raise CheckpointError(f"{info.url}/{rel}: content does not match the manifest (sha256 "
                                      f"{digest[:12]}... vs {meta['sha256'][:12]}...); delete this checkpoint "
                                      f"directory to resume from the previous one")
        try:
            load_engine(engine, os.path.join(local, "engine"))
            if ema is not None:
                ema_file = os.path.join(local, "ema.pt")
                if not os.path.exists(ema_file):
                    raise CheckpointError(f"{info.url}: no EMA state for rank {self.rank}")
                ema.load_state_dict(torch.load(ema_file, weights_only=True)["state"])
            client = torch.load(os.path.join(local, "client.pt"), weights_only=True)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        return client
