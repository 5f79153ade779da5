"""Released pi-Flow students (the paper's checkpoints) <-> this project's student (`piflow import`).

Layouts (read from the reference code, Lakonik/piFlow):
- pi-FLUX.1 / pi-Qwen-Image adapters (`GMFluxTransformer2DModel` / `GMQwenImageTransformer2DModel` subfolders,
  diffusion_pytorch_model.safetensors, keys optionally prefixed `transformer.`): LoRA tensors
  `<module>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r) with alpha = r (scale 1), and the head
  `proj_out_means` (K*64 rows, k-major, feature c*4 + i*2 + j: the same order as ours), `proj_out_logweights`
  (K*4 rows, k-major), `proj_out_logstds.{1,3}` (SiLU, Linear, SiLU, Linear on the detached temb), and where
  trained `norm_out.linear`. Only the names change.
- GM-DiT (ImageNet, full fine-tune; a .pth/.safetensors state dict): the FM-DiT trunk under the names of
  `models/families/dit_fm.py`, one `proj_out_2` of p*p*K*(C+1) rows ordered PATCH-FIRST, row = (i*p + j)*G + g
  with G = K*(C+1), g < K*C the mean of (k, c) = k*C + c and g = K*C + k the logit of component k; the logstd MLP
  is `gm_out.logstd_layers.{1,3}`. Ours is COMPONENT-FIRST: means row = k*(p*p*C) + (i*p + j)*C + c, logweights
  row = k*p*p + (i*p + j): a row permutation (`gm_dit_rows`).
`to_*` functions write our student back in those layouts; import -> export -> import is exact.
"""
from __future__ import annotations

import re

import torch

Tensors = dict[str, torch.Tensor]
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")


class ReleasedLayoutError(ValueError):
    """A released checkpoint that does not fit the student; the message names the file and the tensor."""


def strip_prefix(sd: Tensors) -> Tensors:
    """Module names as the transformer sees them: `transformer.` (diffusers) / `base_model.model.` (PEFT) prefixes
    and PEFT's adapter-name infix (`lora_A.default.weight`) removed."""
    out = {}
    for k, v in sd.items():
        for prefix in ("transformer.", "base_model.model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[re.sub(r"\.(lora_[AB])\.[A-Za-z_0-9]+\.weight$", r".\1.weight", k)] = v
    return out


# --------------------------------------------------------------------------------------- pi-FLUX / pi-Qwen
def lora_targets(sd: Tensors) -> list[str]:
    """Module-name suffixes of the adapted modules (block list and index dropped), for `lora.target_modules`."""
    targets = []
    for k in sd:
        if k.endswith(".lora_A.weight"):
            module = k[: -len(".lora_A.weight")]
            m = re.match(rf"(?:{'|'.join(BLOCK_LISTS)})\.\d+\.(.+)", module)
            suffix = m.group(1) if m else module.split(".", 1)[-1]
            if suffix not in targets:
                targets.append(suffix)
    return targets


def adapter_settings(sd: Tensors, out_dim: int, source: str) -> dict:
    """num_components, lora rank/targets, logstd width read off a pi-FLUX/pi-Qwen adapter."""
    sd = strip_prefix(sd)
    for k in ("proj_out_means.weight", "proj_out_logweights.weight", "proj_out_logstds.1.weight"):
        if k not in sd:
            raise ReleasedLayoutError(f"{source}: not a pi-Flow GM adapter: no {k}")
    rows = sd["proj_out_means.weight"].shape[0]
    if rows % out_dim:
        raise ReleasedLayoutError(f"{source}: proj_out_means has {rows} rows, not a multiple of {out_dim} features")
    ranks = {v.shape[0] for k, v in sd.items() if k.endswith(".lora_A.weight")}
    if len(ranks) > 1:
        raise ReleasedLayoutError(f"{source}: LoRA ranks differ across modules ({sorted(ranks)})")
    return {"num_components": rows // out_dim, "logstd_inner_dim": sd["proj_out_logstds.1.weight"].shape[0],
            "rank": ranks.pop() if ranks else 0, "targets": lora_targets(sd)}


def from_pi_adapter(sd: Tensors, student, source: str) -> Tensors:
    """A pi-FLUX.1 / pi-Qwen-Image adapter -> our LoRA student's trained tensors (names only)."""
    sd = strip_prefix(sd)
    ours = dict(student.named_parameters())
    out = {}
    for k, v in sd.items():
        if ".lora_A.weight" in k or ".lora_B.weight" in k:
            module, kind = k.rsplit(".lora_", 1)
            name = f"transformer.{module}.lora_{kind[0]}.default.weight"
        elif k.startswith(("proj_out_means.", "proj_out_logweights.", "proj_out_logstds.")):
            name = "head." + k
        elif k.startswith("norm_out."):
            name = "tail." + k
        else:
            raise ReleasedLayoutError(f"{source}: unexpected tensor {k} (a pi-Flow adapter holds LoRA, the GM head and "
                               f"norm_out)")
        if name not in ours:
            raise ReleasedLayoutError(f"{source}: {k} has no place in the student ({name}); check lora.target_modules "
                               f"and the base model")
        if tuple(ours[name].shape) != tuple(v.shape):
            raise ReleasedLayoutError(f"{source}: {k} has shape {tuple(v.shape)}, the student's {name} "
                               f"{tuple(ours[name].shape)}")
        out[name] = v
    missing = [n for n, p in ours.items() if p.requires_grad and n not in out and not n.startswith("tail.")]
    if missing:
        raise ReleasedLayoutError(f"{source}: the adapter lacks {missing[:3]} (LoRA modules of the student)")
    return out


def to_pi_adapter(student) -> Tensors:
    """Our LoRA student's trained tensors in the released adapter layout (`transformer.` prefixed)."""
    out = {}
    for n, p in student.named_parameters():
        if not p.requires_grad:
            continue
        if n.startswith("transformer.") and ".lora_" in n:
            module, kind = n[len("transformer."):].rsplit(".lora_", 1)
            out[f"transformer.{module}.lora_{kind[0]}.weight"] = p.detach().clone()
        elif n.startswith("head.") or n.startswith("tail."):
            out["transformer." + n.split(".", 1)[1]] = p.detach().clone()
    return out


# ------------------------------------------------------------------------------------------------ GM-DiT
def gm_dit_rows(K: int, C: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the reference proj_out_2 rows: (means rows in our order, logweights rows in our order)."""
    P, G = p * p, K * (C + 1)
    k = torch.arange(K).view(K, 1, 1)
    pix = torch.arange(P).view(1, P, 1)
    c = torch.arange(C).view(1, 1, C)
    means = (pix * G + k * C + c).reshape(-1)  # ours: k*(P*C) + pix*C + c
    logw = (torch.arange(P).view(1, P) * G + K * C + torch.arange(K).view(K, 1)).reshape(-1)  # ours: k*P + pix
    return means, logw


def gm_dit_settings(sd: Tensors, source: str) -> dict:
    for k in ("pos_embed.proj.weight", "proj_out_2.weight", "gm_out.logstd_layers.1.weight"):
        if k not in sd:
            raise ReleasedLayoutError(f"{source}: not a GM-DiT state dict: no {k}")
    _, C, p, _ = sd["pos_embed.proj.weight"].shape
    G = sd["proj_out_2.weight"].shape[0] // (p * p)
    if G % (C + 1):
        raise ReleasedLayoutError(f"{source}: proj_out_2 has {G} channels per pixel, not K x (C + 1) with C = {C}")
    return {"num_components": G // (C + 1), "logstd_inner_dim": sd["gm_out.logstd_layers.1.weight"].shape[0],
            "channels": C, "patch": p}


def from_gm_dit(sd: Tensors, student, source: str) -> Tensors:
    """A released GM-DiT state dict -> our full DiT student's tensors (trunk by name, head permuted)."""
    s = gm_dit_settings(sd, source)
    K, C, p = s["num_components"], s["channels"], s["patch"]
    means, logw = gm_dit_rows(K, C, p)
    w, b = sd["proj_out_2.weight"], sd["proj_out_2.bias"]
    out = {"head.proj_out_means.weight": w[means], "head.proj_out_means.bias": b[means],
           "head.proj_out_logweights.weight": w[logw], "head.proj_out_logweights.bias": b[logw]}
    for i in (1, 3):
        for t in ("weight", "bias"):
            out[f"head.proj_out_logstds.{i}.{t}"] = sd[f"gm_out.logstd_layers.{i}.{t}"]
    for k, v in sd.items():
        if not k.startswith(("proj_out_2.", "gm_out.")) and k != "pos_embed.pos_embed":
            out["transformer." + k] = v
    ours = student.state_dict()
    for name, v in out.items():
        if name not in ours:
            raise ReleasedLayoutError(f"{source}: {name.split('.', 1)[1]} has no place in the student")
        if tuple(ours[name].shape) != tuple(v.shape):
            raise ReleasedLayoutError(f"{source}: {name} has shape {tuple(v.shape)}, the student {tuple(ours[name].shape)}")
    missing = [n for n in ours if n not in out and not n.startswith("teacher_tail.")]
    if missing:
        raise ReleasedLayoutError(f"{source}: the checkpoint lacks {missing[:3]}")
    return out


def to_gm_dit(student, C: int, p: int) -> Tensors:
    """Our DiT student in the released GM-DiT layout (patch-first proj_out_2)."""
    sd = {n: t.detach().clone() for n, t in student.state_dict().items()}
    K = student.head.num_components
    means, logw = gm_dit_rows(K, C, p)
    rows = p * p * K * (C + 1)
    D = sd["head.proj_out_means.weight"].shape[1]
    w = torch.zeros(rows, D, dtype=sd["head.proj_out_means.weight"].dtype)
    b = torch.zeros(rows, dtype=w.dtype)
    w[means], b[means] = sd["head.proj_out_means.weight"], sd["head.proj_out_means.bias"]
    w[logw], b[logw] = sd["head.proj_out_logweights.weight"], sd["head.proj_out_logweights.bias"]
    out = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
    out.update({"proj_out_2.weight": w, "proj_out_2.bias": b})
    for i in (1, 3):
        for t in ("weight", "bias"):
            out[f"gm_out.logstd_layers.{i}.{t}"] = sd[f"head.proj_out_logstds.{i}.{t}"]
    return out
