"""`piflow import KIND SOURCE --config CONFIG --out DIR`: a released pi-Flow student (pi-FLUX.1 or pi-Qwen-Image
adapter, ImageNet GM-DiT; layouts in models/converters/released.py) as an export dir of this project: `piflow
sample DIR` samples it, the standalone pipeline loads it with diffusers alone, and `to_*` writes it back.

The config is the recipe the student belongs to (base model, family, distill settings); the number of
components, the logstd width and the LoRA rank and targets are read off the checkpoint (alpha = rank, the
reference's scale 1), so a mismatch cannot slip through: every tensor must land on a student tensor of its shape.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from trainer.config import Config, ConfigError

log = logging.getLogger(__name__)
KINDS = {"pi-flux": ("flux",), "pi-qwen": ("qwen_image",), "gm-dit": ("dit",)}


def read_released(source: str | Path) -> dict[str, torch.Tensor]:
    """A dir (diffusers layout: diffusion_pytorch_model.safetensors) or a .safetensors/.pth file (no pickle)."""
    from models.converters.dit_fm import load_tensors

    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise ConfigError(f"{path}: expected one .safetensors file in the adapter dir, found "
                              f"{[f.name for f in files]}")
        path = files[0]
    return load_tensors(path)


def import_released(kind: str, source: str | Path, cfg: Config, out_dir: str | Path):
    """Build the student of `cfg` with the released tensors and write it as an export dir. Returns the model."""
    from models.converters import released
    from models.pipeline import PiFlowPipeline, PiFlowStudent
    from trainer.standalone_export import write_standalone

    if cfg.model.family not in KINDS[kind]:
        raise ConfigError(f"piflow import {kind}: the config's model.family is {cfg.model.family!r}, expected "
                          f"{' or '.join(KINDS[kind])}")
    src = str(source)
    sd = read_released(source)
    if kind == "gm-dit":
        s = released.gm_dit_settings(sd, src)
        if s["channels"] != cfg.model.latent_channels:
            raise ConfigError(f"{src}: {s['channels']} latent channels, the config has {cfg.model.latent_channels}")
        cfg.policy.type, cfg.lora.enabled = "gm", False
        cfg.policy.num_components, cfg.policy.logstd_inner_dim = s["num_components"], s["logstd_inner_dim"]
        model = PiFlowStudent(piflow=cfg.to_dict(), kind="full")
        tensors = released.from_gm_dit(sd, model.student, src)
    else:
        s = released.adapter_settings(sd, 4 * cfg.model.latent_channels, src)
        cfg.policy.type, cfg.lora.enabled = "gm", True
        cfg.policy.num_components, cfg.policy.logstd_inner_dim = s["num_components"], s["logstd_inner_dim"]
        cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules = s["rank"], float(s["rank"]), s["targets"]
        torch.manual_seed(cfg.run.seed)
        model = PiFlowStudent(piflow=cfg.to_dict(), kind="lora")
        tensors = released.from_pi_adapter(sd, model.student, src)
    with torch.no_grad():
        state = model.student.state_dict()
        for name, value in tensors.items():
            state[name].copy_(value.to(state[name].dtype))
    transformer = getattr(model.student, "transformer", None)
    if model.config.kind == "full" and transformer is not None:
        model.register_to_config(transformer_config=dict(transformer.config))
    PiFlowPipeline.from_student(model).save_pretrained(str(out_dir))
    write_standalone(model, cfg, out_dir, step=0)
    log.info("imported %s %s into %s (%d tensors)", kind, src, out_dir, len(tensors))
    return model
