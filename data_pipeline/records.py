"""The prompt record (DESIGN.md §5), its validation, and the counters of bad records.

A shard sample is `__key__`, `txt` (UTF-8 prompt) and an optional `json` object with `negative_prompt` (str),
`seed` (int) and `size` ([height, width]); pre-encoded shards add embeddings (`emb.pth`: a dict of tensors
saved with torch.save, `emb.safetensors` packed by data_pipeline/encoding/packing.py, or `NAME.npy` / `NAME.pth`
single tensors). Validation is a pure function of the
sample bytes, so skipping bad records keeps the global order deterministic and resume exact.
"""
from __future__ import annotations

import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

log = logging.getLogger(__name__)

BadReason = Literal["unreadable_member", "missing_txt", "empty_txt", "invalid_utf8", "overlong", "bad_json",
                    "bad_embedding"]
Overlong = Literal["truncate", "skip"]
MAX_KEPT_BAD = 1000  # bad records kept with shard + key for reports; beyond this only counts grow
MAX_WARNINGS_PER_REASON = 20  # log lines per reason; the counters keep counting after that

META_KEYS = {"negative_prompt": str, "seed": int, "size": list}
# The data latent of a latent-shard sample (`KEY.latent.npy`, (C, H, W)): training data, not conditioning.
LATENT_KEY = "latent"


@dataclass
class PromptRecord:
    key: str
    txt: str
    shard: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # negative_prompt / seed / size (validated) + extras
    # name -> torch.Tensor without batch dim (pre-encoded: as stored, see data_pipeline/compact.py; or encoded),
    # or a compact.Deferred (a DataWorker put them in Ray's object store)
    embeddings: Optional[Any] = None
    truncated_from: int = 0  # original length in chars when the prompt was truncated, else 0


@dataclass(frozen=True)
class BadRecord:
    shard: str
    key: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.shard} key={self.key!r}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class DataStats:
    """Counters of what the reader consumed: good samples, bad records by reason, truncations, skipped shards."""

    samples: int = 0
    truncated: int = 0
    bad: Counter = field(default_factory=Counter)  # reason -> count
    bad_records: list[BadRecord] = field(default_factory=list)  # first MAX_KEPT_BAD, with shard + key
    skipped_shards: list[tuple[str, str]] = field(default_factory=list)  # (shard url, error)

    def add_bad(self, bad: BadRecord) -> None:
        self.bad[bad.reason] += 1
        if len(self.bad_records) < MAX_KEPT_BAD:
            self.bad_records.append(bad)
        if self.bad[bad.reason] <= MAX_WARNINGS_PER_REASON:
            log.warning("bad prompt record skipped: %s", bad)

    def add_truncated(self, shard: str, key: str, n_chars: int, limit: int) -> None:
        self.truncated += 1
        if self.truncated <= MAX_WARNINGS_PER_REASON:
            log.warning("prompt truncated: %s key=%r: %d chars > max_prompt_chars=%d", shard, key, n_chars, limit)

    def add_skipped_shard(self, shard: str, error: str) -> None:
        self.skipped_shards.append((shard, error))
        log.error("shard skipped after retries: %s: %s", shard, error)

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Flat numbers for the metrics logger (cumulative)."""
        out = {f"{prefix}samples": float(self.samples), f"{prefix}truncated": float(self.truncated),
               f"{prefix}bad_records": float(self.bad_total), f"{prefix}skipped_shards": float(len(self.skipped_shards))}
        for reason, n in sorted(self.bad.items()):
            out[f"{prefix}bad/{reason}"] = float(n)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "truncated": self.truncated, "bad": dict(self.bad),
                "skipped_shards": [list(s) for s in self.skipped_shards]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples = int(state["samples"])
        self.truncated = int(state["truncated"])
        self.bad = Counter({str(k): int(v) for k, v in state["bad"].items()})
        self.skipped_shards = [(str(a), str(b)) for a, b in state["skipped_shards"]]
        self.bad_records = []


def _parse_meta(raw: bytes) -> dict[str, Any]:
    meta = json.loads(raw.decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    for name, tp in META_KEYS.items():
        if name in meta and meta[name] is not None:
            v = meta[name]
            if not isinstance(v, tp) or isinstance(v, bool):
                raise ValueError(f"'{name}' must be {tp.__name__}, got {v!r}")
            if name == "size" and (len(v) != 2 or not all(isinstance(s, int) and s > 0 for s in v)):
                raise ValueError(f"'size' must be [height, width] positive integers, got {v!r}")
    return meta


def load_embeddings(members: dict[str, bytes]) -> Optional[dict[str, Any]]:
    """Embeddings of a pre-encoded sample: `emb.pth` (dict), `NAME.pth` or `NAME.npy` (one tensor each)."""
    out: dict[str, Any] = {}
    for ext, raw in members.items():
        if ext.endswith(".safetensors") or ext == "safetensors":  # `piflow shards encode` (bf16/fp8, packed)
            from safetensors.torch import load  # kept as stored (data_pipeline/compact.py): no float32 here

            out.update(load(raw))
        elif ext.endswith(".pth") or ext == "pth":
            import torch

            obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                if not all(isinstance(v, torch.Tensor) for v in obj.values()):
                    raise ValueError(f"{ext}: expected a dict of tensors")
                out.update({str(k): v for k, v in obj.items()})
            elif isinstance(obj, torch.Tensor):
                out[ext[: -len(".pth")] or "emb"] = obj
            else:
                raise ValueError(f"{ext}: expected a tensor or a dict of tensors, got {type(obj).__name__}")
        elif ext.endswith(".npy") or ext == "npy":
            import numpy as np
            import torch

            arr = np.load(io.BytesIO(raw), allow_pickle=False)
            out[ext[: -len(".npy")] or "emb"] = torch.from_numpy(arr)
    return out or None


def validate_sample(key: str, members: dict[str, bytes], shard: str, max_chars: int, overlong: Overlong,
                    need_embeddings: bool = False,
                    ) -> tuple[Optional[PromptRecord], Optional[BadRecord]]:
    """Turn one sample's members (extension -> bytes) into a record, or a BadRecord saying why not.

    Over-long prompts are truncated to `max_chars` (the record keeps `truncated_from`) or skipped, per
    `overlong`. Nothing is counted here: the reader counts what it consumes, so counters resume exactly.
    """
    raw = members.get("txt")
    if raw is None:
        return None, BadRecord(shard, key, "missing_txt", f"members: {sorted(members)}")
    try:
        txt = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, BadRecord(shard, key, "invalid_utf8", f"byte {e.start}")
    if not txt.strip():
        return None, BadRecord(shard, key, "empty_txt")
    if max_chars > 0 and len(txt) > max_chars:
        if overlong == "skip":
            return None, BadRecord(shard, key, "overlong", f"{len(txt)} chars > {max_chars}")
        truncated_from = len(txt)
        txt = txt[:max_chars]
    else:
        truncated_from = 0
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = _parse_meta(members["json"])
        except (ValueError, UnicodeDecodeError) as e:
            return None, BadRecord(shard, key, "bad_json", str(e)[:200])
    embeddings = None
    emb_members = {k: v for k, v in members.items()
                   if k.endswith((".pth", ".npy", ".safetensors")) or k in ("pth", "npy", "safetensors")}
    if emb_members:
        try:
            embeddings = load_embeddings(emb_members)
        except Exception as e:  # noqa: BLE001 - any decode failure makes this one record bad
            return None, BadRecord(shard, key, "bad_embedding", f"{type(e).__name__}: {str(e)[:200]}")
    if need_embeddings and not set(embeddings or ()) - {LATENT_KEY}:
        return None, BadRecord(shard, key, "bad_embedding", "pre-encoded shard sample has no emb.pth/.npy member")
    return PromptRecord(key=key, txt=txt, shard=shard, meta=meta, embeddings=embeddings,
                        truncated_from=truncated_from), None
