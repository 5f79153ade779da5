"""Compact storage of one sample's embeddings (`KEY.emb.safetensors`) and its exact inverse layout.

- Floating tensors are stored as bfloat16 (default), float32, or float8_e4m3fn with a per-tensor float32
  scale (`NAME@scale`, amax / 448, the largest e4m3 value), as the reference caches its text embeddings.
- A sequence tensor NAME with a mask NAME_mask (Qwen-Image: prompt_embeds + prompt_embeds_mask) is stored only
  up to the prompt's length: the mask is stored whole, the rows beyond it (zeros, masked out) are not. The
  reader zero-pads back to the mask's length. FLUX's T5 output has no mask: the FLUX transformer attends to
  every one of the 512 positions, whose values depend on the prompt, so all of them are kept.
- Integer tensors (masks, class labels) are stored as they are.
Unpacked tensors are float32 (integers keep their dtype). safetensors: no pickle, deterministic bytes.
"""
from __future__ import annotations

from typing import Literal

import torch

StoreDtype = Literal["float32", "bf16", "fp8"]
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_SUFFIX = "@scale"
MARKER = "__piflow_packed__"


def _prompt_length(mask: torch.Tensor) -> int:
    """The number of leading ones of a left-aligned 0/1 mask; -1 when the mask is not of that form."""
    n = int(mask.sum())
    ok = mask.dim() == 1 and bool((mask[:n] == 1).all()) and bool((mask[n:] == 0).all())
    return n if ok else -1


def pack(embeddings: dict[str, torch.Tensor], dtype: StoreDtype = "bf16") -> dict[str, torch.Tensor]:
    """One sample's embeddings (no batch dim) -> the tensors to store."""
    if dtype not in ("float32", "bf16", "fp8"):
        raise ValueError(f"storage dtype must be float32, bf16 or fp8, got {dtype!r}")
    out = {MARKER: torch.ones(1, dtype=torch.uint8)}
    for name, t in embeddings.items():
        t = t.detach().cpu()
        mask = embeddings.get(f"{name}_mask")
        if mask is not None and t.dim() >= 1 and t.shape[0] == mask.shape[-1]:
            n = _prompt_length(mask.cpu())
            if n >= 0:
                t = t[:n]  # the rows past the prompt are zeros the model masks out
        if not t.is_floating_point():
            out[name] = t.contiguous()
        elif dtype == "float32":
            out[name] = t.float().contiguous()
        elif dtype == "bf16":
            out[name] = t.to(torch.bfloat16).contiguous()
        else:
            amax = float(t.float().abs().max()) if t.numel() else 0.0
            scale = amax / FP8_MAX if amax > 0 else 1.0
            out[name] = (t.float() / scale).to(torch.float8_e4m3fn).contiguous()
            out[f"{name}{SCALE_SUFFIX}"] = torch.tensor([scale], dtype=torch.float32)
    return out


def unpack(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse layout of `pack`: float32 tensors (dequantised), sequences zero-padded to their mask."""
    if MARKER not in stored:
        return dict(stored)
    out = {}
    for name, t in stored.items():
        if name == MARKER or name.endswith(SCALE_SUFFIX):
            continue
        if t.is_floating_point():
            t = t.float()
            scale = stored.get(f"{name}{SCALE_SUFFIX}")
            if scale is not None:
                t = t * float(scale[0])
        mask = stored.get(f"{name}_mask")
        if mask is not None and t.dim() >= 1 and t.shape[0] < mask.shape[-1]:
            t = torch.cat([t, t.new_zeros((mask.shape[-1] - t.shape[0], *t.shape[1:]))])
        out[name] = t
    return out


def to_bytes(embeddings: dict[str, torch.Tensor], dtype: StoreDtype = "bf16") -> bytes:
    from safetensors.torch import save

    return save(pack(embeddings, dtype))


def from_bytes(raw: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return unpack(load(raw))
