"""Checkpoints on object storage (DESIGN.md §6): per-rank files, a manifest written last, uploads off the
training thread, retention.

Layout under `run.output` (a local dir or `s3://`; all access through `data_pipeline.storage`):

    checkpoints/step_00001000/
      rank_00000/state.safetensors  this rank's flat partition of every trained parameter: fp32 master
                                 weights, Adam moments, EMA shadow (and, torch engine, the untrained tensors)
      rank_00000/state.json      format, world size, step counters, and per parameter its name, full shape,
                                 numel and where this rank's partition lies in the flattened tensor
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

Safe, resharding loads: engine and EMA state are safetensors (no pickle: DeepSpeed's own checkpoint files
are pickles loaded with `weights_only=False`, so they are not used), the client state is `torch.save`d and
read back with `weights_only=True` (it must hold only tensors, numbers, strings and containers). Every
manifest and part is checked (structure; paths relative, inside a rank dir, no '..') and every downloaded
file's sha256 is compared with the manifest before anything is applied. Because each partition records
where it lies in the flattened tensor, a checkpoint written by W ranks loads at any W' (`RankStates`).
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
from trainer.checkpoint.files import (CLIENT_FILE, FORMAT_VERSION, STATE_FILE, STATE_META,  # noqa: F401 (re-exported)
                                      CheckpointError, RankStates, check_files, check_manifest, check_rel,
                                      rank_dirname, read_rank_state, write_rank_state)

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
UPLOAD_ATTEMPTS = 5  # whole-rank attempts on top of storage.py's per-call retries; a retry skips done files
_STEP_RE = re.compile(r"^step_(\d{8,})$")


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


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
    """The checked manifest; None when there is none or it is not JSON (a partial upload); CheckpointError
    when it is JSON of the wrong structure (it names the file and the key)."""
    url = storage.join(ckpt_url, MANIFEST)
    try:
        data = json.loads(storage.get_bytes(url).decode("utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        log.warning("%s: unreadable manifest (%s); treating the checkpoint as partial", url, e)
        return None
    return check_manifest(url, data)


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


def latest_valid(run_output: str, verify_mode: Literal["size", "sha256"] = "size",
                 below: Optional[int] = None) -> Optional[CheckpointInfo]:
    """The newest checkpoint (with step < `below`, if given) whose manifest exists, is well-formed and whose
    files match it; None if there is none. Each one skipped is a warning naming the file and the reason.

    'size' (the resume default) compares sizes from a listing; each rank then checks the sha256 of the
    files it downloads (`CheckpointManager.fetch`). 'sha256' reads every file here (export, tests)."""
    for step in reversed(list_steps(run_output)):
        if below is not None and step >= below:
            continue
        url = storage.join(checkpoints_url(run_output), step_dirname(step))
        try:
            manifest = read_manifest(url)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", url, e)
            continue
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


def retained_steps(valid_steps: list[int], keep_last: int, keep_every: int,
                   finite_steps: Optional[list[int]] = None) -> set[int]:
    """Keep the last `keep_last` steps plus every step that is a multiple of `keep_every` (0 = off), plus the
    newest of `finite_steps` (checkpoints whose recorded loss was finite; None = all of them)."""
    keep = set(sorted(valid_steps)[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {s for s in valid_steps if s % keep_every == 0}
    finite = valid_steps if finite_steps is None else [s for s in valid_steps if s in set(finite_steps)]
    if finite:
        keep.add(max(finite))
    return keep


def overlapping_ranks(meta_dirs: dict[int, str], needed: list, where: str) -> list[int]:
    """The old ranks (their state.json in `meta_dirs`) whose partitions hold any element of the `needed` slots
    (name, numel, start, length: elements [start, min(start + length, numel)) of each flattened tensor)."""
    want: dict[str, list[tuple[int, int]]] = {}
    for slot in needed:
        lo, hi = slot.start, min(slot.start + slot.length, slot.numel)
        if lo < hi:
            want.setdefault(slot.name, []).append((lo, hi))
    out = []
    for rank, d in sorted(meta_dirs.items()):
        try:
            with open(os.path.join(d, STATE_META)) as f:
                rows = json.load(f)["slots"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{where}/{rank_dirname(rank)}/{STATE_META}: unreadable rank state ({e})") from None
        for name, _shape, numel, start, length in rows:
            a, b = int(start), min(int(start) + int(length), int(numel))
            if any(max(a, lo) < min(b, hi) for lo, hi in want.get(name, ())):
                out.append(rank)
                break
    return out or [min(meta_dirs)]  # nothing trained here (an empty partition): one rank for the counters


# -------------------------------------------------------------------------------------------- manager
@dataclass
class _Job:
    step: int
    local_dir: str  # staging/step_N/rank_R
    meta: dict[str, Any]
    uploaded: dict[str, dict[str, Any]] = field(default_factory=dict)  # rel -> size/sha256, kept across retries


class PartTimeout(CheckpointError):
    """Rank 0 waited `part_timeout_s` for another rank's part: retrying the whole upload would not help."""


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
    `close()`, so every rank's uploads are finished before any process exits. `any_rank(flag)` (e.g. the
    engine's all-reduce) lets resume agree on falling back when one rank's download fails its checks.

    Failures are loud: after `max_failed_uploads` consecutive uploads of this rank failed for good, the next
    `save` raises with the cause (training does not go on unprotected); rank 0 waits at most `part_timeout_s`
    for the other ranks' parts, once (a missing part is not retried)."""

    def __init__(self, run_output: str, rank: int = 0, world_size: int = 1, keep_last: int = 2,
                 keep_every: int = 0, queue_size: int = 2, barrier: Optional[Callable[[], None]] = None,
                 staging_dir: Optional[str] = None, part_timeout_s: float = 300.0, max_failed_uploads: int = 2,
                 any_rank: Optional[Callable[[bool], bool]] = None, scratch: str = ""):
        if keep_last < 1:
            raise ValueError(f"train.ckpt_keep_last must be >= 1, got {keep_last}")
        if queue_size < 1:
            raise ValueError(f"train.upload_queue must be >= 1, got {queue_size}")
        if max_failed_uploads < 1:
            raise ValueError(f"train.max_failed_uploads must be >= 1, got {max_failed_uploads}")
        self.run_output = run_output
        self.root = checkpoints_url(run_output)
        self.rank, self.world_size = rank, world_size
        self.keep_last, self.keep_every = keep_last, keep_every
        self.barrier = barrier
        self.any_rank = any_rank or (lambda flag: bool(flag))
        self.part_timeout_s = part_timeout_s
        self.max_failed_uploads = max_failed_uploads
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
        self.consecutive_failures = 0
        self.last_failure = ""

    # ----------------------------------------------------------------------------------------- save
    def check_uploads(self) -> None:
        """Raise when the last `max_failed_uploads` uploads of this rank all failed (called by `save`)."""
        if self.consecutive_failures >= self.max_failed_uploads:
            raise CheckpointError(
                f"rank {self.rank}: {self.consecutive_failures} consecutive checkpoint uploads failed (steps "
                f"{self.failed_steps[-self.consecutive_failures:]}) under {self.root}; last cause: {self.last_failure}. "
                f"Stopping instead of training unprotected (train.max_failed_uploads={self.max_failed_uploads}); "
                f"the previous valid checkpoint is untouched and the same command resumes from it")

    def save(self, step: int, engine, ema=None, client_state: Optional[dict[str, Any]] = None,
             module: Optional[torch.nn.Module] = None, meta: Optional[dict[str, Any]] = None) -> float:
        """Snapshot this rank's state at `step` and queue its upload. Returns the seconds training waited
        for a free queue slot. `meta` (rank 0, JSON-able: config, config hash, wandb id, loss) goes into the
        manifest. `module` is unused (kept for callers; the engine names its parameters)."""
        self.check_uploads()
        from trainer.scratch import ensure_free

        local = os.path.join(self.staging, step_dirname(step), rank_dirname(self.rank))
        if os.path.exists(local):
            shutil.rmtree(local)
        ensure_free(self.staging, max(self._staged_bytes, staging_bytes_estimate(engine, ema)),
                    f"staging the step {step} checkpoint of rank {self.rank}")
        os.makedirs(local)
        write_rank_state(engine, ema, local)
        torch.save({"step": step, **(client_state or {})}, os.path.join(local, CLIENT_FILE))
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
        cause = ""
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                self._upload(job, url)
                if self.rank == 0:
                    self._finalize(job, url)
                self.completed_steps.append(job.step)
                self.consecutive_failures = 0
                shutil.rmtree(os.path.dirname(job.local_dir), ignore_errors=True)
                return
            except PartTimeout as e:  # another rank's part never came: waiting again would not bring it
                cause = str(e)
                log.warning("checkpoint %s rank 0: %s", url, e)
                break
            except Exception as e:  # noqa: BLE001 - logged, retried, then recorded
                cause = f"{type(e).__name__}: {e}"
                log.warning("checkpoint %s rank %d: upload attempt %d/%d failed: %s",
                            url, self.rank, attempt, UPLOAD_ATTEMPTS, cause)
                if attempt < UPLOAD_ATTEMPTS:
                    time.sleep(min(60.0, 2.0 ** attempt))
        log.error("checkpoint %s rank %d: giving up; the previous checkpoint stays the newest valid one",
                  url, self.rank)
        self.failed_steps.append(job.step)
        self.last_failure = f"step {job.step}: {cause}"
        self.consecutive_failures += 1
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
        parts = self._wait_for_parts(url, job.step)
        files: dict[str, dict[str, Any]] = {}
        for part in parts:
            files.update(part["files"])
        manifest = {"format": FORMAT_VERSION, "step": job.step, "world_size": self.world_size,
                    "created_unix": time.time(), "files": files, "meta": job.meta}
        check_manifest(storage.join(url, MANIFEST), manifest)
        storage.put_bytes(storage.join(url, MANIFEST), json.dumps(manifest, indent=1).encode())
        log.info("checkpoint %s complete (%d files)", url, len(files))
        self._prune(job.step)

    def _read_part(self, part_url: str, rank: int, step: int) -> dict[str, Any]:
        try:
            part = json.loads(storage.get_bytes(part_url))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{part_url}: not a JSON part ({e})") from None
        if not isinstance(part, dict) or part.get("rank") != rank or part.get("step") != step:
            raise CheckpointError(f"{part_url}: expected the part of rank {rank} for step {step}, got "
                                  f"rank {part.get('rank') if isinstance(part, dict) else '?'!r}")
        files = check_files(part.get("files"), part_url)
        prefix = rank_dirname(rank) + "/"
        if any(not rel.startswith(prefix) for rel in files):
            raise CheckpointError(f"{part_url}: lists files outside {prefix}")
        return part

    def _wait_for_parts(self, url: str, step: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.part_timeout_s
        delay = 0.05
        while True:
            parts = []
            for r in range(self.world_size):
                part_url = storage.join(url, "parts", f"{rank_dirname(r)}.json")
                try:
                    parts.append(self._read_part(part_url, r, step))
                except FileNotFoundError:
                    break
            if len(parts) == self.world_size:
                return parts
            if time.monotonic() > deadline:
                raise PartTimeout(f"{url}: rank {len(parts)}'s part (and maybe later ones) missing after "
                                  f"{self.part_timeout_s:.0f}s; only {len(parts)}/{self.world_size} ranks uploaded "
                                  f"(train.ckpt_part_timeout_s)")
            time.sleep(delay)
            delay = min(2.0, delay * 2)

    def _prune(self, newest: int) -> None:
        remove_partial(self.run_output, below=newest)
        valid, finite = [], []
        for s in list_steps(self.run_output):
            try:
                manifest = read_manifest(storage.join(self.root, step_dirname(s)))
            except CheckpointError:
                manifest = None  # a malformed manifest is not a checkpoint: nothing to retain or delete here
            if manifest is not None:
                valid.append(s)
                if manifest.get("meta", {}).get("loss_finite", True):
                    finite.append(s)
        keep = retained_steps(valid, self.keep_last, self.keep_every, finite)
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
                                  f"under {self.root}; last cause: {self.last_failure}")

    # ----------------------------------------------------------------------------------------- load
    def fetch(self, info: CheckpointInfo, needed: Optional[list] = None) -> tuple[RankStates, str]:
        """Download what this rank needs of `info` into staging, checking each file's size and sha256 against
        the manifest; returns (the rank states, the client-state file). Same world size: this rank's own
        files. Another world size: every old rank's small state.json first, then the state files only of the
        old ranks whose partitions overlap `needed` (this rank's engine slots, `engine.slots()`; None: all of
        them), and the client state of rank `rank % W` (issue 21: a 16 -> 8 GPU resume of FLUX fetched every
        old rank's state on every rank). The free space of the staging dir is checked first. Raises
        CheckpointError naming the file that fails; nothing is applied yet."""
        from trainer.scratch import ensure_free

        manifest = check_manifest(f"{info.url}/{MANIFEST}", info.manifest)
        old_world = manifest["world_size"]
        same = old_world == self.world_size
        client_rank = self.rank if same else self.rank % old_world
        local = os.path.join(self.staging, "load", step_dirname(info.step))
        shutil.rmtree(local, ignore_errors=True)
        if same:
            state_ranks = [self.rank]
        else:
            metas = [f"{rank_dirname(r)}/{STATE_META}" for r in range(old_world)]
            self._download(info, manifest, metas, local)
            state_ranks = list(range(old_world)) if needed is None else overlapping_ranks(
                {r: os.path.join(local, rank_dirname(r)) for r in range(old_world)}, needed, info.url)
        wanted = {f"{rank_dirname(r)}/{name}" for r in state_ranks for name in (STATE_FILE, STATE_META)}
        wanted.add(f"{rank_dirname(client_rank)}/{CLIENT_FILE}")
        todo = sorted(rel for rel in wanted if not os.path.exists(os.path.join(local, *rel.split("/"))))
        missing = [rel for rel in todo if rel not in manifest["files"]]
        if missing:
            raise CheckpointError(f"{info.url}: the manifest lists no {missing[0]} (a checkpoint of format "
                                  f"{FORMAT_VERSION} has {STATE_FILE}, {STATE_META} and {CLIENT_FILE} per rank)")
        ensure_free(self.staging, sum(manifest["files"][rel]["size"] for rel in todo),
                    f"loading {len(todo)} files of {info.url} on rank {self.rank}")
        self._download(info, manifest, todo, local)
        dirs = {r: os.path.join(local, rank_dirname(r)) for r in state_ranks}
        states = RankStates(dirs, info.url)
        if states.first["world_size"] != old_world:
            raise CheckpointError(f"{info.url}: rank state says world size {states.first['world_size']}, the "
                                  f"manifest {old_world}")
        return states, os.path.join(local, rank_dirname(client_rank), CLIENT_FILE)

    def _download(self, info: CheckpointInfo, manifest: dict[str, Any], rels: list[str], local: str) -> None:
        root = os.path.realpath(local)
        for rel in rels:
            meta = manifest["files"].get(rel)
            if meta is None:
                raise CheckpointError(f"{info.url}: the manifest lists no {rel}")
            path = os.path.join(local, *check_rel(rel, info.url).split("/"))
            if not os.path.realpath(path).startswith(root + os.sep):  # belt and braces on top of check_rel
                raise CheckpointError(f"{info.url}: {rel!r} resolves outside the staging dir")
            storage.download(storage.join(info.url, *rel.split("/")), path)
            digest, size = sha256_file(path), os.path.getsize(path)
            if digest != meta["sha256"] or size != meta["size"]:
                raise CheckpointError(f"{info.url}/{rel}: content does not match the manifest (sha256 "
                                      f"{digest[:12]}... vs {meta['sha256'][:12]}..., {size} vs {meta['size']} "
                                      f"bytes)")

    def apply(self, fetched: tuple[RankStates, str], engine, ema=None) -> dict:
        """Restore the engine and EMA from `fetch`'s files (resharded), return the client state dict."""
        states, client_file = fetched
        try:
            read_rank_state(engine, ema, states)
            return torch.load(client_file, weights_only=True)
        finally:
            states.handles.clear()
            shutil.rmtree(os.path.join(self.staging, "load"), ignore_errors=True)

    def load(self, info: CheckpointInfo, engine, ema=None, module: Optional[torch.nn.Module] = None) -> dict:
        """`fetch` + `apply` (no fallback: see `trainer.checkpoint.resume.resume_state`)."""
        return self.apply(self.fetch(info), engine, ema)
