"""The files of one checkpoint and their checks (trainer/checkpoint/store.py moves and lists them).

Per rank: `state.safetensors` (its flat partition of every trained parameter: fp32 master weights, Adam moments,
EMA shadow; torch engine: also the untrained tensors), `state.json` (format, world size, step counters, and per
parameter where the partition lies in the flattened tensor) and `client.pt` (step, data cursor, RNGs; read
with `weights_only=True`). Nothing is ever unpickled, and because each partition says where it lies, a
checkpoint written by W ranks is read by any W' (`RankStates.partition`). Manifests and per-rank parts from
the bucket are checked before use: JSON structure, and file paths relative, inside a rank dir, without '..'.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

FORMAT_VERSION = 2  # 2: engine and EMA state as resharding safetensors partitions (1: DeepSpeed pickles)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the checkpoint and the file."""


def rank_dirname(rank: int) -> str:
    return f"rank_{rank:05d}"


# ------------------------------------------------------------------------------------ rank state files
STATE_FILE = "state.safetensors"  # this rank's flat partitions: master/, exp_avg/, exp_avg_sq/, ema/, frozen/
STATE_META = "state.json"  # format, rank, world size, engine counters, the slots (where each partition lies)
CLIENT_FILE = "client.pt"  # step, data cursor, RNG states: torch.save, read with weights_only=True


def write_rank_state(engine, ema, local_dir: str) -> None:
    """This rank's engine partitions (fp32 master weights, Adam moments) and EMA shadow as one safetensors
    file plus a JSON description of the slots. Nothing here needs pickle to read back, and any world size
    can read it (`RankStates` reshards)."""
    from safetensors.torch import save_file

    os.makedirs(local_dir, exist_ok=True)
    slots = engine.slots()
    tensors = engine.local_state()
    if ema is not None:
        if len(ema.shadow) != len(slots):
            raise CheckpointError(f"EMA tracks {len(ema.shadow)} tensors, the engine trains {len(slots)}")
        for slot, shadow in zip(slots, ema.shadow):
            tensors[f"ema/{slot.name}"] = shadow.detach().reshape(-1).float().cpu().clone()
    tensors.update({f"frozen/{k}": v for k, v in engine.frozen_state().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(local_dir, STATE_FILE))
    meta = {"format": FORMAT_VERSION, "rank": int(getattr(engine, "rank", 0)), "world_size": engine_world(engine),
            "engine": type(engine).__name__, "counters": engine.counters(),
            "slots": [[s.name, list(s.shape), s.numel, s.start, s.length] for s in slots],
            "ema": {"gamma": ema.gamma, "start": ema.start} if ema is not None else None}
    with open(os.path.join(local_dir, STATE_META), "w") as f:
        json.dump(meta, f)


def engine_world(engine) -> int:
    return int(getattr(engine, "world_size", 1))


class RankStates:
    """The rank state files of one checkpoint (a subset of its ranks, downloaded to local dirs).

    `partition(kind, target)` cuts the flat partition a NEW layout wants (`target`, a `Slot` of the engine
    that loads) out of the OLD ranks' partitions, reading only the overlapping ranges (safetensors slices).
    With the same world size that is the rank's own file; with another one, pieces of several."""

    def __init__(self, dirs: dict[int, str], where: str):
        from safetensors import safe_open

        from trainer.torch_engine import Slot

        self.where = where
        self.meta: dict[int, dict[str, Any]] = {}
        self.slots: dict[int, dict[str, Any]] = {}
        self.handles = {}
        for rank, d in sorted(dirs.items()):
            path = os.path.join(d, STATE_META)
            try:
                with open(path) as f:
                    meta = json.load(f)
                if meta.get("format") != FORMAT_VERSION:
                    raise CheckpointError(f"{where}/{rank_dirname(rank)}/{STATE_META}: format {meta.get('format')!r}, "
                                          f"this version reads {FORMAT_VERSION}")
                slots = {row[0]: Slot(row[0], tuple(row[1]), int(row[2]), int(row[3]), int(row[4]))
                         for row in meta["slots"]}
                _ = (int(meta["world_size"]), dict(meta["counters"]))
            except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
                raise CheckpointError(f"{where}/{rank_dirname(rank)}/{STATE_META}: unreadable rank state "
                                      f"({type(e).__name__}: {e})") from None
            self.meta[rank], self.slots[rank] = meta, slots
            self.handles[rank] = safe_open(os.path.join(d, STATE_FILE), framework="pt")
        self.first = self.meta[min(self.meta)]

    @property
    def counters(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.first["counters"].items()}

    def names(self) -> set[str]:
        return set(self.slots[min(self.slots)])

    def has(self, key: str) -> bool:
        return key in self.handles[min(self.handles)].keys()

    def partition(self, kind: str, target) -> torch.Tensor:
        """(target.length,) fp32: elements [target.start, target.start + target.length) of the flattened full
        tensor `kind/NAME`, zero past numel (ZeRO-3 padding)."""
        out = torch.zeros(target.length, dtype=torch.float32)
        lo, hi = target.start, min(target.start + target.length, target.numel)
        covered = 0
        for rank, slots in self.slots.items():
            old = slots.get(target.name)
            if old is None:
                raise CheckpointError(f"{self.where}: no '{target.name}' in rank {rank}'s state")
            if old.numel != target.numel or tuple(old.shape) != tuple(target.shape):
                raise CheckpointError(f"{self.where}: '{target.name}' has shape {tuple(old.shape)} in the checkpoint, "
                                      f"{tuple(target.shape)} in this model")
            a, b = max(lo, old.start), min(hi, old.start + old.length, old.numel)
            if a < b:
                piece = self.handles[rank].get_slice(f"{kind}/{target.name}")[a - old.start:b - old.start]
                out[a - lo:b - lo] = piece.float()
                covered += b - a
        if covered != max(hi - lo, 0):
            raise CheckpointError(f"{self.where}: the ranks read cover {covered} of the {hi - lo} elements of "
                                  f"'{target.name}' this rank needs")
        return out

    def frozen(self) -> dict[str, torch.Tensor]:
        h = self.handles[min(self.handles)]
        return {k[len("frozen/"):]: h.get_tensor(k) for k in h.keys() if k.startswith("frozen/")}


def read_rank_state(engine, ema, states: RankStates) -> None:
    """Restore the engine and the EMA from `states`, resharded to the engine's own slots."""
    slots = engine.slots()
    missing, extra = {s.name for s in slots} - states.names(), states.names() - {s.name for s in slots}
    if missing or extra:
        raise CheckpointError(f"{states.where}: trained parameters differ from this model's: only in the model "
                              f"{sorted(missing)[:5]}, only in the checkpoint {sorted(extra)[:5]}")
    from trainer.torch_engine import ADAM_STATES

    tensors = {f"{kind}/{s.name}": states.partition(kind, s) for s in slots for kind in ("master",) + ADAM_STATES}
    engine.load_local_state(tensors, states.counters, frozen=states.frozen())
    if ema is not None:
        if not states.has(f"ema/{slots[0].name}"):
            raise CheckpointError(f"{states.where}: the checkpoint holds no EMA state")
        with torch.no_grad():
            for slot, shadow in zip(slots, ema.shadow):
                shadow.copy_(states.partition("ema", slot).view_as(shadow))
        saved = states.first.get("ema") or {}
        ema.gamma, ema.start = saved.get("gamma", ema.gamma), saved.get("start", ema.start)


# ------------------------------------------------------------------------------------- manifest checks
# A manifest path: rank_RRRRR/ then plain names (no '..', no absolute path, no backslash): a manifest from the
# bucket must never make a rank read or write outside the checkpoint or its own staging dir.
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_RANK_RE = re.compile(r"^rank_(\d{5})$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def check_rel(rel: Any, where: str) -> str:
    """A manifest file path, or CheckpointError naming it: relative, inside a rank dir, no '..'."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if (len(parts) < 2 or not _RANK_RE.match(parts[0])
            or any(p in (".", "..") or not _SEGMENT_RE.match(p) for p in parts[1:])):
        raise CheckpointError(f"{where}: file path {rel!r} is not a relative path inside a rank dir "
                              f"(expected rank_NNNNN/name[/name...] without '..')")
    return rel


def check_files(files: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(files, dict):
        raise CheckpointError(f"{where}: 'files' must be a mapping of path -> {{size, sha256}}, got "
                              f"{type(files).__name__}")
    for rel, meta in files.items():
        check_rel(rel, where)
        if (not isinstance(meta, dict) or not isinstance(meta.get("size"), int) or isinstance(meta.get("size"), bool)
                or meta["size"] < 0 or not isinstance(meta.get("sha256"), str) or not _SHA_RE.match(meta["sha256"])):
            raise CheckpointError(f"{where}: entry {rel!r} must be {{\"size\": int >= 0, \"sha256\": 64 hex digits}}, "
                                  f"got {meta!r}"[:300])
    return files


def check_manifest(where: str, data: Any) -> dict[str, Any]:
    """The structure of a MANIFEST.json, or CheckpointError naming the file and the first thing wrong."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: a manifest must be a JSON object, got {type(data).__name__}")
    for key, kind in (("format", int), ("step", int), ("world_size", int), ("files", dict)):
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise CheckpointError(f"{where}: key '{key}' must be {kind.__name__}, got {data.get(key)!r}"[:300])
    if data["format"] != FORMAT_VERSION:
        raise CheckpointError(f"{where}: format {data['format']}, this version reads format {FORMAT_VERSION} "
                              f"(checkpoints of format 1 held DeepSpeed pickles, which are never loaded)")
    if data["world_size"] < 1 or data["step"] < 0:
        raise CheckpointError(f"{where}: world_size must be >= 1 and step >= 0")
    if not isinstance(data.get("meta", {}), dict):
        raise CheckpointError(f"{where}: 'meta' must be a JSON object")
    check_files(data["files"], where)
    ranks = {int(_RANK_RE.match(rel.split("/")[0]).group(1)) for rel in data["files"]}
    if not ranks <= set(range(data["world_size"])):
        raise CheckpointError(f"{where}: files of ranks {sorted(ranks - set(range(data['world_size'])))} in a "
                              f"checkpoint of world size {data['world_size']}")
    return data
