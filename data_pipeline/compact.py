"""Embeddings kept in their stored dtype from the shard to the rank's device (issue 22).

A sample's embeddings are the dict `packing.pack` writes (and `safetensors.torch.load` gives back): floats as
stored (fp8 with a per-tensor `NAME@scale`, bf16 or float32), a masked sequence trimmed to its prompt's rows,
the `__piflow_packed__` marker; or plain tensors (an encoder's output, `.pth` / `.npy` members). Nothing is
dequantised or padded on the host:

- `payload(emb)` / `from_payload(raw)`: one sample as safetensors bytes, the form a DataWorker puts in Ray's
  object store (no pickle, and fp8 tensors do not survive pickling in torch 2.13 anyway);
- `EmbeddingBatch.stack(samples)`: a batch, still compact: dense `(B, ...)` where every sample has the same
  shape, ragged `(sum of rows, ...)` + rows per sample where a sequence's length varies (Qwen-Image);
- `EmbeddingBatch.to(device, dtype)`: on the rank's device, the dense tensors the model takes: dequantised
  (fp8 x scale in float32), cast to the compute dtype, zero-padded. Integer tensors (masks) keep their dtype.

`batch[name]` is the dense view on the CPU with today's dtypes (packed floats as float32, others as stored):
what the reader gave before, for inspection and tests; training never takes it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from data_pipeline.encoding.packing import MARKER, SCALE_SUFFIX

_BYTE_VIEW = (torch.float8_e4m3fn, torch.float8_e5m2)  # dtypes that pickle as uint8 views


def names_of(emb: dict[str, torch.Tensor]) -> list[str]:
    """The embedding names of a sample (the packing marker and the fp8 scales are not embeddings)."""
    return sorted(n for n in emb if n != MARKER and not n.endswith(SCALE_SUFFIX))


def _packed_length(emb: dict[str, torch.Tensor], name: str) -> int:
    """Rows of `name` in its dense form: the mask's length for a sequence stored trimmed, else its own."""
    t = emb[name]
    mask = emb.get(f"{name}_mask")
    if MARKER in emb and mask is not None and t.dim() >= 1 and t.shape[0] < mask.shape[-1]:
        return int(mask.shape[-1])
    return int(t.shape[0]) if t.dim() else 0


def signature(emb: Any) -> dict[str, list[int]]:
    """name -> [ndim, *shape[1:]] of the dense form: what must agree for samples to stack (dim 0 may differ).
    Accepts a sample's dict or a `Deferred` (which carries it)."""
    if isinstance(emb, Deferred):
        return emb.signature
    return {n: [int(emb[n].dim()), *(int(d) for d in emb[n].shape[1:])] for n in names_of(emb)}


def lengths(emb: dict[str, torch.Tensor]) -> dict[str, int]:
    """name -> rows of its dense form (the batch pads dim 0 to the longest of these)."""
    return {n: _packed_length(emb, n) for n in names_of(emb) if emb[n].dim()}


def nbytes(emb: Any) -> int:
    if emb is None:
        return 0
    if isinstance(emb, Deferred):
        return emb.nbytes
    return sum(t.numel() * t.element_size() for t in emb.values())


def payload(emb: dict[str, torch.Tensor]) -> bytes:
    """One sample's embeddings as safetensors bytes, in their stored dtypes."""
    from safetensors.torch import save

    # a tensor that views a larger storage (a row of an encoder batch, a `.pth` of slices) is copied alone
    return save({k: (v.detach().contiguous() if v.untyped_storage().nbytes() == v.numel() * v.element_size()
                     else v.detach().clone()) for k, v in emb.items()})


def from_payload(raw: Any) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(bytes(raw))


@dataclass
class Deferred:
    """A sample's embeddings that are not here: `handle` names its `payload` bytes (a Ray object put by the
    DataWorker that read it; only cluster/ code fetches it). The stream needs only what travels beside it."""

    handle: Any
    signature: dict[str, list[int]]
    lengths: dict[str, int]
    nbytes: int


# --------------------------------------------------------------------------------------------- batches
@dataclass
class Entry:
    """One embedding name over a batch, as stored."""

    data: torch.Tensor  # (B, *shape) dense, or (sum(rows), *shape[1:]) ragged; stored dtype
    scale: Optional[torch.Tensor] = None  # (B,) float32: fp8 dequantisation scale per sample
    rows: Optional[torch.Tensor] = None  # (B,) int64 rows per sample when ragged
    length: int = 0  # ragged: dim 0 of the dense form (the batch's longest)
    upcast: bool = False  # the CPU dense view is float32 (a packed float, as `packing.unpack` gives)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.data.dtype in _BYTE_VIEW:  # pickling fp8 fails to load in torch 2.13: send the bytes
            state["data"], state["_dtype"] = self.data.view(torch.uint8), str(self.data.dtype).split(".")[-1]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        dtype = state.pop("_dtype", None)
        if dtype is not None:
            state["data"] = state["data"].view(getattr(torch, dtype))
        self.__dict__.update(state)

    @property
    def size(self) -> int:
        return int(self.rows.numel()) if self.rows is not None else int(self.data.shape[0])

    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (self.scale, self.rows) if t is not None)
        return self.data.numel() * self.data.element_size() + extra

    def slice(self, idx: list[int]) -> "Entry":
        index = torch.tensor(idx, dtype=torch.long)
        scale = self.scale.index_select(0, index) if self.scale is not None else None
        if self.rows is None:
            return Entry(self.data.index_select(0, index), scale, None, 0, self.upcast)
        starts = torch.cumsum(self.rows, 0) - self.rows
        parts = [self.data[int(starts[i]):int(starts[i]) + int(self.rows[i])] for i in idx]
        data = torch.cat(parts) if parts else self.data[:0]
        return Entry(data, scale, self.rows.index_select(0, index), self.length, self.upcast)

    def dense(self, device: Any = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """(B, *shape) on `device`: floats dequantised and cast to `dtype` (None: float32 when `upcast`, else
        as stored), ragged rows zero-padded to `length`. The bytes cross to the device as stored."""
        x = self.data.to(device) if device is not None else self.data
        if x.is_floating_point():
            target = dtype or (torch.float32 if self.upcast else x.dtype)
            if self.scale is not None:
                s = self.scale.to(x.device)
                s = s.repeat_interleave(self.rows.to(x.device)) if self.rows is not None else s
                x = (x.float() * s.view(-1, *[1] * (x.dim() - 1))).to(target)
            else:
                x = x.to(target)
        if self.rows is None:
            return x
        rows = self.rows.to(x.device)
        B = int(rows.numel())
        b = torch.repeat_interleave(torch.arange(B, device=x.device), rows)
        r = torch.arange(x.shape[0], device=x.device) - (torch.cumsum(rows, 0) - rows)[b]
        out = x.new_zeros((B, self.length, *x.shape[1:]))
        out[b, r] = x
        return out


class EmbeddingBatch(Mapping):
    """A batch's embeddings in their stored dtype (see the module docstring). A read-only mapping name ->
    dense CPU tensor for inspection; `to(device, dtype)` is what a rank calls."""

    def __init__(self, entries: dict[str, Entry], size: int):
        self.entries, self.size = entries, size

    @classmethod
    def stack(cls, samples: list[dict[str, torch.Tensor]],
              pad_to: Optional[dict[str, int]] = None) -> "EmbeddingBatch":
        """Samples (each a stored dict) -> one batch; `pad_to` (name -> rows) pads ragged names to a longer
        batch's length (a rank stacks its slice of a global batch)."""
        if not samples:
            raise ValueError("no samples to stack")
        names = names_of(samples[0])
        entries = {}
        for name in names:
            parts, scales = [], []
            for s in samples:
                if name not in s:
                    raise ValueError(f"embedding {name!r} missing in a sample (the first sample has {names})")
                parts.append(s[name])
                scales.append(s.get(f"{name}{SCALE_SUFFIX}"))
            shapes = sorted({tuple(p.shape) for p in parts})
            # only dim 0 (a sequence's length) may differ: those are zero-padded, as masked-out positions
            if len(shapes) > 1 and (len({(p.dim(), tuple(p.shape[1:])) for p in parts}) != 1 or parts[0].dim() == 0):
                raise ValueError(f"embedding {name!r} has incompatible shapes in one batch: {shapes[:4]}")
            upcast = all(MARKER in s for s in samples) and parts[0].is_floating_point()
            if len({p.dtype for p in parts}) > 1 or len({sc is None for sc in scales}) > 1:
                # stored in different formats: no common compact form, so the batch carries float32
                parts = [_dequantised(p, sc) for p, sc in zip(parts, scales)]
                scales, upcast = [None] * len(parts), False
            scale = torch.cat([sc.reshape(1).float() for sc in scales]) if scales[0] is not None else None
            lens = [_packed_length(s, name) for s in samples]
            length = max(lens + [int((pad_to or {}).get(name, 0))])
            if parts[0].dim() and (len({p.shape[0] for p in parts}) > 1 or any(n != length for n in lens)):
                rows = torch.tensor([p.shape[0] for p in parts], dtype=torch.long)
                entries[name] = Entry(torch.cat(parts), scale, rows, length, upcast)
            else:
                entries[name] = Entry(torch.stack(parts), scale, None, 0, upcast)
        return cls(entries, len(samples))

    def slice(self, idx: list[int]) -> "EmbeddingBatch":
        return EmbeddingBatch({n: e.slice(idx) for n, e in self.entries.items()}, len(idx))

    def without(self, *names: str) -> "EmbeddingBatch":
        return EmbeddingBatch({n: e for n, e in self.entries.items() if n not in names}, self.size)

    def to(self, device: Any, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """Dense tensors on `device` for the model: floats in `dtype` (None: the CPU view's dtypes)."""
        return {n: e.dense(device, dtype) for n, e in self.entries.items()}

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in self.entries.values())

    def dtypes(self) -> dict[str, torch.dtype]:
        return {n: e.data.dtype for n, e in self.entries.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.entries[name].dense()

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {tuple(e.data.shape)} {str(e.data.dtype).split('.')[-1]}"
                          + (" ragged" if e.rows is not None else "") for n, e in self.entries.items())
        return f"EmbeddingBatch({self.size} samples; {parts})"


def _dequantised(t: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    return t.float() * float(scale.reshape(-1)[0]) if scale is not None else t.float()


def vote_key(sig: dict[str, list[int]]) -> str:
    """A signature as the stream's vote counts it (and its cursor stores it)."""
    return json.dumps(sig, sort_keys=True)
