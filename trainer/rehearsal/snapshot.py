"""The tiny same-family model a rehearsal trains instead of the recipe's teacher (the depth and width part of the
shrink), written where the real loader finds it.

`write_model_dir(cfg, root)` writes a diffusers-format directory like the released one: the family's
transformer at reduced depth and width (its `tiny_config`), seeded, in the recipe's dtype; the text encoders and
tokenizers (tiny CLIP + T5, Qwen2.5-VL, UMT5: trained word-level tokenizers, no downloads); a VAE with the
real compression (8x spatial; Wan and Qwen-Image 4x temporal) and the real normalisation constants; the scheduler
config and model_index.json. `write_hub_snapshot(cfg, cache)` puts that directory into a hub cache in the layout
huggingface_hub reads (`models--ORG--NAME/refs/main` -> `snapshots/<revision>/`), so with `HF_HUB_CACHE` pointing
there and `HF_HUB_OFFLINE=1` the recipe's own hub id resolves to it through trainer/weights.py and every
`from_pretrained`. Nothing here imports huggingface_hub (trainer/weights.py owns it): the layout is written by hand.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from trainer.config import Config

# the tiny architectures, as the docs state them (depth and width; text width 32 = the tiny text encoders)
TINY_ARCH = {
    "flux": "1 double-stream + 1 single-stream block (of 19 + 38), 2 heads x 16 (of 24 x 128); CLIP + T5 width 32",
    "qwen_image": "2 blocks (of 60), 2 heads x 16 (of 24 x 128); Qwen2.5-VL width 32",
    "dit": "2 blocks (of 28), 2 heads x 8 (of 16 x 72)",
    "wan": "2 blocks (of 40), 2 heads x 12 (of 40 x 128), FFN 48; UMT5 width 32",
}
PIPELINES = {"flux": "FluxPipeline", "qwen_image": "QwenImagePipeline", "wan": "WanPipeline"}


def _vae(cfg: Config):
    """A seeded VAE of the family's class with the released compression and normalisation."""
    C, family = cfg.model.latent_channels, cfg.model.family
    g = torch.Generator().manual_seed(cfg.run.seed + 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed + 2)
        if family in ("flux", "dit"):
            from models.vae_encoder import tiny_vae

            return tiny_vae(family, C, seed=cfg.run.seed + 2)  # 3 downsamplings: 8x, SD-VAE / FLUX constants
        stats = dict(latents_mean=(torch.randn(C, generator=g) * 0.3).tolist(),
                     latents_std=(1 + torch.rand(C, generator=g)).tolist())
        if family == "qwen_image":
            from diffusers import AutoencoderKLQwenImage as cls
        else:
            from diffusers import AutoencoderKLWan as cls
        return cls(base_dim=8, z_dim=C, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                   temperal_downsample=[False, True, True], **stats).eval()


def _text_components(cfg: Config) -> dict[str, object]:
    family = cfg.model.family
    if family in ("flux", "qwen_image"):
        from models.text_encoders import tiny_text_encoders

        return tiny_text_encoders(family, cfg.run.seed)
    if family == "wan":
        from models.families.wan import tiny_wan_text_encoder

        model, tok = tiny_wan_text_encoder(cfg.run.seed)
        return {"text_encoder": model, "tokenizer": tok}
    return {}  # dit: class ids, no text encoder


def _cast_as_loaded(network: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast to `dtype` the way `from_pretrained(torch_dtype=dtype)` leaves a released model: the class's
    `_keep_in_fp32_modules` (Wan: rope, time embedder, norms, scale-shift table) stay float32, matched as
    diffusers matches them (a name component of the tensor). Casting tensor by tensor also keeps ModelMixin.to's
    warning about those modules out of the rehearsal's output."""
    keep = tuple(getattr(network, "_keep_in_fp32_modules", None) or ())
    for name, t in [*network.named_parameters(), *network.named_buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return network


def write_model_dir(cfg: Config, root: str | Path) -> Path:
    """The tiny same-family model of `cfg` as a diffusers-format directory under `root`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from models.families import get_family

    family = get_family(cfg.model.family)
    root = Path(root)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        network = family.transformer_class(**family.tiny_config(cfg))
    _cast_as_loaded(network, dtype).save_pretrained(str(root / (cfg.model.subfolder or "transformer")))
    components = _text_components(cfg)
    for name, component in components.items():
        component.save_pretrained(str(root / name))
    _vae(cfg).save_pretrained(str(root / "vae"))
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.distill.shift).save_pretrained(
        str(root / "scheduler"))
    if cfg.model.family in PIPELINES:
        from diffusers import __version__

        index = {"_class_name": PIPELINES[cfg.model.family], "_diffusers_version": __version__,
                 "transformer": ["diffusers", type(network).__name__], "vae": ["diffusers", None],
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
        for name, component in components.items():
            index[name] = ["transformers", type(component).__name__]
        (root / "model_index.json").write_text(json.dumps(index, indent=1))
    return root


def revision(repo_id: str) -> str:
    """A fixed 40-hex revision for the rehearsal's snapshot of `repo_id`."""
    return hashlib.sha1(f"piflow-rehearsal:{repo_id}".encode()).hexdigest()


def write_hub_snapshot(cfg: Config, cache: str | Path) -> Path:
    """The tiny model as the hub cache's snapshot of `cfg.model.pretrained` (a hub id); returns the snapshot dir."""
    repo_id = cfg.model.pretrained
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    rev = revision(repo_id)
    snapshot = write_model_dir(cfg, repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "blobs").mkdir(exist_ok=True)
    return snapshot
