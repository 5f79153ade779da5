"""`piflow convert dit-fm CHECKPOINT --out DIR`: the reference flow-matching DiT checkpoint (pi-Flow's
`flowdit_imagenet.pth`, the ImageNet teacher) -> a diffusers-format dir the dit family loads
(`DIR/transformer` = `FlowDiTTransformer2DModel`, `DIR/scheduler` = flow-matching Euler, shift 1, T = 1000).

The reference state dict uses the module names of `models/families/dit_fm.py` (pos_embed.proj, emb.*, per block
norm1.linear / attn1.to_{q,k,v,out.0} / ff.net.{0.proj,2}, proj_out_{1,2}); training checkpoints wrap it in
`state_dict` with a `diffusion_ema.denoising.` (preferred) or `diffusion.denoising.` prefix. Loading never runs
pickle: `.pth` files go through `torch.load(weights_only=True)`, `.safetensors` through safetensors. The
architecture is read off the tensor shapes (width, depth, classes, patch, channels); the head count is not in
the shapes (DiT-XL/2: 16 x 72; `--num-heads` overrides). Refused with the reason: the original DDPM DiT
(facebookresearch layout, or learned sigma = 2C outputs: epsilon + variance, not a velocity), missing or
unexpected tensors, and a stored position table that is not the 2-D sincos one this network recomputes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

PREFIXES = ("diffusion_ema.denoising.", "diffusion.denoising.", "denoising.", "module.")
# keys of the original DDPM DiT (facebookresearch/DiT's DiT-XL-2-256x256.pt and its re-uploads)
DDPM_DIT_KEYS = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight")


class ConvertError(ValueError):
    """A checkpoint this converter refuses; the message names the file and what was expected."""


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a .pth/.pt (no pickle: weights_only) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError and friends: the file needs code execution to load
        raise ConvertError(f"{path}: not loadable as plain tensors without pickle (torch.load weights_only=True: "
                           f"{str(e).splitlines()[0]})") from None
    return unwrap(raw, str(path))


def unwrap(raw, source: str) -> dict[str, torch.Tensor]:
    """Strip the training-checkpoint wrapping: `state_dict`/`ema`/`model` sections and module prefixes (EMA
    weights preferred)."""
    for key in ("state_dict", "ema", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ConvertError(f"{source}: expected a dict of tensors (optionally under 'state_dict')")
    for prefix in PREFIXES:
        picked = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
        if picked:
            return picked
    return dict(raw)


def infer_config(sd: dict[str, torch.Tensor], source: str, num_heads: Optional[int] = None,
                 sample_size: Optional[int] = None) -> dict:
    """FlowDiTTransformer2DModel kwargs from the tensor shapes."""
    if any(k in sd for k in DDPM_DIT_KEYS):
        raise ConvertError(f"{source}: this is the original DDPM DiT layout (x_embedder/t_embedder/final_layer: "
                           f"epsilon prediction with learned sigma), not the flow-matching reference; pi-Flow "
                           f"needs the flow-matching teacher (e.g. Lakonik/pi-Flow-ImageNet teachers/flowdit_imagenet.pth)")
    need = ("pos_embed.proj.weight", "emb.class_embedder.embedding_table.weight", "proj_out_2.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ConvertError(f"{source}: not the reference FM-DiT layout: no {missing[0]} (keys start "
                           f"{sorted(sd)[:3]})")
    dim, c_in, p, _ = sd["pos_embed.proj.weight"].shape
    c_out = sd["proj_out_2.weight"].shape[0] // (p * p)
    if c_out == 2 * c_in:
        raise ConvertError(f"{source}: proj_out_2 has {2 * c_in} channels per pixel = 2 x in_channels: a "
                           f"learned-sigma DDPM DiT (epsilon + variance), not a flow-matching velocity")
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    heads = num_heads or (16 if dim in (1152, 1024) else max(1, dim // 64))  # DiT-XL/L: 16 heads; S/B: 64 per head
    if dim % heads:
        raise ConvertError(f"{source}: width {dim} is not divisible by --num-heads {heads}")
    if sample_size is None:
        table = sd.get("pos_embed.pos_embed")
        sample_size = int(round(table.shape[1] ** 0.5)) * p if table is not None else 32
    return dict(num_attention_heads=heads, attention_head_dim=dim // heads, in_channels=c_in, out_channels=c_out,
                num_layers=layers, sample_size=sample_size, patch_size=p,
                num_embeds_ada_norm=sd["emb.class_embedder.embedding_table.weight"].shape[0] - 1)


def convert_dit_fm(checkpoint: str | Path, out_dir: str | Path, num_heads: Optional[int] = None,
                   sample_size: Optional[int] = None) -> Path:
    """Write `out_dir/transformer` and `out_dir/scheduler`; returns out_dir."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from models.families.dit_fm import FlowDiTTransformer2DModel

    source = str(checkpoint)
    sd = load_tensors(checkpoint)
    config = infer_config(sd, source, num_heads, sample_size)
    model = FlowDiTTransformer2DModel(**config)
    table = sd.pop("pos_embed.pos_embed", None)  # a buffer the network recomputes: check it, do not load it
    if table is not None:
        ours = model.pos_embed.pos_embed
        if table.shape != ours.shape or not torch.allclose(table.float(), ours.float(), atol=1e-4):
            raise ConvertError(f"{source}: pos_embed.pos_embed is not the 2-D sincos table of a "
                               f"{config['sample_size']}^2 latent with patch {config['patch_size']}")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ConvertError(f"{source}: tensors do not match a FM-DiT of {config}: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ConvertError(f"{source}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    out = Path(out_dir)
    model.save_pretrained(str(out / "transformer"))
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(str(out / "scheduler"))
    (out / "converted_from.json").write_text(json.dumps({"source": source, "converter": "dit-fm",
                                                         "config": config}, indent=1))
    return out
