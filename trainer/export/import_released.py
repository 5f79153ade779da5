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
    from trainer.export.standalone import write_standalone

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


# settings an init student must share with the run (they fix the tensor shapes and meanings)
MATCH = (("model", "family"), ("model", "latent_channels"), ("policy", "type"), ("policy", "num_components"),
         ("policy", "logstd_inner_dim"), ("lora", "enabled"), ("lora", "rank"), ("lora", "target_modules"))


def init_student_tensors(cfg: Config, student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of `model.init_student` (an export dir), checked against this run's config and
    student: a mismatch is one line naming the key and the value to set."""
    import json

    from safetensors.torch import load_file

    from models.pipeline import WEIGHTS_NAME

    root = Path(cfg.model.init_student) / "student"
    if not (root / "config.json").is_file():
        raise ConfigError(f"model.init_student: {root}/config.json not found (an export dir of piflow export or "
                          f"piflow import)")
    theirs = json.loads((root / "config.json").read_text())["piflow"]
    for section, key in MATCH:
        want, have = theirs[section][key], getattr(getattr(cfg, section), key)
        if section == "lora" and not cfg.lora.enabled:
            continue
        if key == "target_modules":
            want, have = sorted(want), sorted(have)
        if want != have:
            raise ConfigError(f"model.init_student: {cfg.model.init_student} has {section}.{key}={want!r}, this "
                              f"run {have!r}: set {section}.{key}={json.dumps(want)}")
    tensors = load_file(str(root / WEIGHTS_NAME))
    names = dict(student.named_parameters())
    names.update(dict(student.named_buffers()))
    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise ConfigError(f"model.init_student: {root}/{WEIGHTS_NAME} holds tensors the student lacks: {unknown[:3]}")
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    if trained - set(tensors):
        raise ConfigError(f"model.init_student: {root}/{WEIGHTS_NAME} lacks trained tensors "
                          f"{sorted(trained - set(tensors))[:3]}")
    return tensors
