"""`piflow export RUN_OR_CHECKPOINT --out DIR`: a checkpoint's EMA student as a diffusers-format directory
(models/pipeline.py describes the format; `PiFlowPipeline.from_pretrained(DIR)` loads it).

Consolidation needs no live engine and no DeepSpeed: every rank's `ema.pt` holds its EMA partition of each
trained parameter with the parameter's name and full shape (trainer/checkpoint.py). Under ZeRO-3 a partition
is the rank's contiguous, padded slice of the flattened parameter, so concatenating the ranks' slices in rank
order and cutting at numel rebuilds the tensor; with one rank it is the tensor itself. The untrained tensors
(the frozen base under LoRA) are the base model's: the student is rebuilt from the checkpoint's config (its
`model.pretrained` reference, or the seeded tiny model), then the EMA tensors are copied in.
"""
from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Optional

import torch

from data_pipeline import storage
from trainer.checkpoint import (MANIFEST, CheckpointError, CheckpointInfo, latest_valid, rank_dirname, read_manifest,
                                verify)
from trainer.config import Config, config_from_dict

log = logging.getLogger(__name__)


def resolve_checkpoint(run_or_checkpoint: str) -> CheckpointInfo:
    """A checkpoint dir (with MANIFEST.json) or a run output (its newest valid checkpoint), sha256-checked."""
    url = run_or_checkpoint.rstrip("/")
    manifest = read_manifest(url)
    if manifest is not None:
        reason = verify(url, manifest, "sha256")
        if reason is not None:
            raise CheckpointError(f"{url}: does not match its {MANIFEST}: {reason}")
        return CheckpointInfo(int(manifest["step"]), url, manifest)
    info = latest_valid(url, "sha256")
    if info is None:
        raise CheckpointError(f"{url}: neither a checkpoint (no {MANIFEST}) nor a run output with a valid checkpoint")
    return info


def checkpoint_config(info: CheckpointInfo) -> Config:
    config = info.manifest.get("meta", {}).get("config")
    if config is None:
        raise CheckpointError(f"{info.url}/{MANIFEST}: no 'meta.config' (the run config is needed to rebuild "
                              f"the student)")
    return config_from_dict(config, source=f"{info.url}/{MANIFEST} meta.config")


def consolidate_ema(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """Full fp32 EMA tensors by parameter name, from every rank's partition."""
    payloads = []
    for rank in range(int(info.manifest["world_size"])):
        rel = f"{rank_dirname(rank)}/ema.pt"
        if rel not in info.manifest["files"]:
            raise CheckpointError(f"{info.url}: no EMA state for rank {rank} ({rel}); the run kept no EMA")
        data = storage.get_bytes(storage.join(info.url, rank_dirname(rank), "ema.pt"))
        payloads.append(torch.load(io.BytesIO(data), weights_only=True))
    names, shapes = payloads[0]["names"], payloads[0]["shapes"]
    out = {}
    for i, (name, shape) in enumerate(zip(names, shapes)):
        flat = torch.cat([p["state"]["shadow"][i].reshape(-1) for p in payloads])
        numel = math.prod(shape)
        if flat.numel() < numel:
            raise CheckpointError(f"{info.url}: EMA partitions of {name} hold {flat.numel()} values, "
                                  f"the parameter has {numel}")
        out[name] = flat[:numel].reshape(shape).clone()
    return out


def export_student(run_or_checkpoint: str, out_dir: str | Path):
    """Write the EMA student of a checkpoint as a diffusers-format directory. Returns the PiFlowPipeline."""
    from models.pipeline import PiFlowPipeline, PiFlowStudent

    info = resolve_checkpoint(run_or_checkpoint)
    cfg = checkpoint_config(info)
    ema = consolidate_ema(info)
    kind = "lora" if cfg.lora.enabled else "full"
    torch.manual_seed(cfg.run.seed)  # the tensors not in the EMA are the base's (seeded for tiny models)
    model = PiFlowStudent(piflow=cfg.to_dict(), kind=kind)
    params = dict(model.student.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    if set(ema) != trained:
        raise CheckpointError(f"{info.url}: EMA tensors do not match the rebuilt student's trained parameters: "
                              f"only in EMA {sorted(set(ema) - trained)[:5]}, "
                              f"not in EMA {sorted(trained - set(ema))[:5]}")
    with torch.no_grad():
        for name, value in ema.items():
            if tuple(params[name].shape) != tuple(value.shape):
                raise CheckpointError(f"{info.url}: EMA {name} has shape {tuple(value.shape)}, the student "
                                      f"{tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))
    transformer = getattr(model.student, "transformer", None)
    if kind == "full" and transformer is not None:  # a full export rebuilds the trunk from its config, not the base
        model.register_to_config(transformer_config=dict(transformer.config))
    pipe = PiFlowPipeline.from_student(model.eval())  # sampling mode: no LoRA dropout in the returned pipe
    pipe.save_pretrained(str(out_dir))
    log.info("exported %s (step %d, %s) to %s", info.url, info.step, kind, out_dir)
    return pipe


def export_summary(out_dir: str | Path) -> Optional[dict]:
    """The export's safetensors metadata (format, kind, family, policy, distill, base model)."""
    from safetensors import safe_open

    from models.pipeline import WEIGHTS_NAME

    with safe_open(str(Path(out_dir) / "student" / WEIGHTS_NAME), framework="pt") as f:
        return f.metadata()
