"""`piflow export RUN_OR_CHECKPOINT --out DIR`: a checkpoint's EMA student as a diffusers-format directory
(models/pipeline.py describes the format; `PiFlowPipeline.from_pretrained(DIR)` loads it).

Consolidation needs no live engine and no DeepSpeed: every rank's `state.safetensors` holds its EMA partition
of each trained parameter and `state.json` where that partition lies in the flattened tensor
(trainer/checkpoint/store.py), so the full tensor is read back as one "partition" covering all of it. The untrained tensors
(the frozen base under LoRA) are the base model's: the student is rebuilt from the checkpoint's config (its
`model.pretrained` reference, or the seeded tiny model), then the EMA tensors are copied in.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch

from data_pipeline import storage
from trainer.checkpoint.store import (MANIFEST, STATE_FILE, STATE_META, CheckpointError, CheckpointInfo, RankStates,
                                latest_valid, rank_dirname, read_manifest, sha256_file, verify)
from trainer.config import Config, config_from_dict

log = logging.getLogger(__name__)


def resolve_checkpoint(run_or_checkpoint: str) -> CheckpointInfo:
    """A checkpoint dir (with MANIFEST.json) or a run output (its newest valid checkpoint), sha256-checked."""
    url = run_or_checkpoint.rstrip("/")
    manifest = read_manifest(url)  # CheckpointError (file and key named) when it is malformed
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
    """Full fp32 EMA tensors by parameter name, from every rank's partition (sha256-checked downloads)."""
    return consolidate(info, "ema")


def consolidate(info: CheckpointInfo, kind: str = "ema") -> dict[str, torch.Tensor]:
    """Full fp32 tensors of one kind ("ema", "master", "exp_avg", "exp_avg_sq") by parameter name."""
    import tempfile

    from trainer.torch_engine import Slot

    world = int(info.manifest["world_size"])
    with tempfile.TemporaryDirectory(prefix="piflow-export-") as tmp:
        dirs = {}
        for rank in range(world):
            for name in (STATE_FILE, STATE_META):
                rel = f"{rank_dirname(rank)}/{name}"
                if rel not in info.manifest["files"]:
                    raise CheckpointError(f"{info.url}: the manifest lists no {rel}")
                path = Path(tmp, rank_dirname(rank), name)
                storage.download(storage.join(info.url, rank_dirname(rank), name), str(path))
                if sha256_file(str(path)) != info.manifest["files"][rel]["sha256"]:
                    raise CheckpointError(f"{info.url}/{rel}: content does not match the manifest")
            dirs[rank] = str(Path(tmp, rank_dirname(rank)))
        states = RankStates(dirs, info.url)
        if kind == "ema" and states.first.get("ema") is None:
            raise CheckpointError(f"{info.url}: the checkpoint holds no EMA state (the run kept no EMA)")
        out = {}
        for name, slot in states.slots[min(states.slots)].items():
            whole = Slot(name, slot.shape, slot.numel, 0, slot.numel)
            out[name] = states.partition(kind, whole).reshape(slot.shape).clone()
        states.handles.clear()
    return out


def export_student(run_or_checkpoint: str, out_dir: str | Path, self_contained: bool = False):
    """Write the EMA student of a checkpoint as a diffusers-format directory: `student/` (this project's format)
    and, for the families it covers, the standalone diffusers pipeline (trainer/export/standalone.py); local or
    on object storage (`s3://`: written to a temp dir, then uploaded with model_index.json last, so a
    half-uploaded export does not load). Returns the PiFlowPipeline."""
    if storage.is_s3(str(out_dir)):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="piflow-export-") as tmp:
            pipe = export_student(run_or_checkpoint, tmp, self_contained)
            index = os.path.join(tmp, "model_index.json")
            moved = index + ".last"
            os.replace(index, moved)
            storage.remove(storage.join(str(out_dir), "model_index.json"))
            storage.upload_dir(tmp, str(out_dir))
            storage.remove(storage.join(str(out_dir), "model_index.json.last"))
            storage.upload(moved, storage.join(str(out_dir), "model_index.json"))
        return pipe
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
    from trainer.export.standalone import write_standalone

    write_standalone(model, cfg, out_dir, info.step, self_contained=self_contained)
    log.info("exported %s (step %d, %s) to %s", info.url, info.step, kind, out_dir)
    return pipe


def export_summary(out_dir: str | Path) -> Optional[dict]:
    """The export's safetensors metadata (format, kind, family, policy, distill, base model); local or s3://
    (only the file's header is parsed: 8-byte little-endian length, then JSON)."""
    import json
    import struct

    from models.pipeline import WEIGHTS_NAME

    url = storage.join(str(out_dir), "student", WEIGHTS_NAME)
    with storage.open_url(url, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header.get("__metadata__")
