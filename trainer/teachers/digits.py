"""The embedded default's teacher: a tiny FLUX-architecture text-to-image model trained by flow matching on
scikit-learn's 8x8 digits (DESIGN.md §9), saved in the diffusers layout the FLUX family loads:

    DIR/transformer/        FluxTransformer2DModel (safetensors)
    DIR/text_encoder{,_2}/  tiny CLIP and T5 encoders (random, frozen), DIR/tokenizer{,_2}/ word-level tokenizers
    DIR/teacher.json        what produced it (spec) and its training loss

Images are 1-channel 8x8 "latents" in [-1, 1] (no VAE at this size). The same family code that distils it
computes the training velocity, so teacher and student share the sign, time and packing conventions.
Deterministic for a given spec (seeded, single-process).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data_pipeline.digits import load_digits_split, prompt_for
from models.families.digits import DIGITS_ARCH
from trainer.config import Config



def digits_teacher_spec(cfg: Config) -> dict:
    m = cfg.model
    return {"family": "digits", "arch": {k: list(v) if isinstance(v, tuple) else v for k, v in DIGITS_ARCH.items()},
            "iters": m.teacher_iters, "batch_size": m.teacher_batch_size, "lr": m.teacher_lr, "seed": m.teacher_seed,
            "max_sequence_length": m.max_sequence_length, "guidance": cfg.teacher.guidance.scale,
            "objective": "flow-matching, sigma = warp(U(0,1), shift=distill.shift), cosine lr, EMA 0.999",
            "shift": cfg.distill.shift}


def train_digits_teacher(cfg: Config, out_dir: str | Path, progress: bool = True) -> Path:
    """Train and save the digits teacher to `out_dir` (replaced atomically). Returns the directory."""
    from diffusers import FluxTransformer2DModel

    from models.families import get_family, load_text_encoder
    from models.text_encoders import save_tiny_text_encoders
    from models.timesteps import warp

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    m = cfg.model
    torch.manual_seed(m.teacher_seed)
    g = torch.Generator().manual_seed(m.teacher_seed)

    save_tiny_text_encoders("flux", tmp, seed=m.teacher_seed)
    enc_cfg = _with_model(cfg, pretrained=str(tmp), text_encoder=str(tmp), tiny=False)
    cond_all = load_text_encoder(enc_cfg)([prompt_for(c) for c in range(10)])  # one row per digit
    network = FluxTransformer2DModel(**DIGITS_ARCH)
    family = get_family(cfg.model.family)

    train = load_digits_split("train")
    x0_all, labels_all = train.images, train.labels  # (N, 1, 8, 8), (N,)
    opt = torch.optim.AdamW(network.parameters(), lr=m.teacher_lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in network.parameters()]
    bar = tqdm(range(m.teacher_iters), desc="digits teacher", disable=not progress)
    running = None
    for it in bar:
        lr = m.teacher_lr * 0.5 * (1 + math.cos(math.pi * it / max(m.teacher_iters, 1)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(x0_all), (m.teacher_batch_size,), generator=g)
        x0, labels = x0_all[idx], labels_all[idx]
        eps = torch.randn(x0.shape, generator=g)
        sigma = warp(torch.rand(len(idx), generator=g), cfg.distill.shift)  # (B,)
        x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
        cond = {k: v[labels] for k, v in cond_all.items()}
        u = family.teacher_velocity(cfg, network, x_t, sigma, cond)  # (B, 1, 8, 8)
        loss = ((u - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, network.parameters()):
                e.lerp_(p, 1 - 0.999 if it > 100 else 1.0)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if it % 50 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
    with torch.no_grad():
        for e, p in zip(ema, network.parameters()):
            p.copy_(e)
    network.save_pretrained(tmp / "transformer", safe_serialization=True)
    (tmp / "teacher.json").write_text(json.dumps({"spec": digits_teacher_spec(cfg), "final_loss": running}, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _with_model(cfg: Config, **changes) -> Config:
    import dataclasses

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **changes))
