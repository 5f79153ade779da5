"""The project's own small teachers: trained here by flow matching, cached as safetensors.

The cache key is a hash of everything that determines the weights (family, data version, network size,
training iterations, batch, lr, seed), so a changed config never reuses a stale teacher and an unchanged one
is trained once per machine. Large teachers (FLUX, Qwen-Image, DiT) come from `model.pretrained` instead.
"""
from __future__ import annotations

import hashlib
import math
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from trainer.config import Config, ConfigError


def teacher_spec(cfg: Config) -> dict:
    """What determines the teacher's weights (the cache key is a hash of this)."""
    if cfg.model.family == "digits":
        from trainer.teachers.digits import digits_teacher_spec

        return digits_teacher_spec(cfg)
    if cfg.model.family == "toy2d":
        from models.families.toy2d import DATA_VERSION

        m = cfg.model
        return {"family": "toy2d", "data": DATA_VERSION, "hidden_dim": m.hidden_dim, "num_layers": m.num_layers,
                "iters": m.teacher_iters, "batch_size": m.teacher_batch_size, "lr": m.teacher_lr,
                "seed": m.teacher_seed, "objective": "flow-matching sigma~U(0,1), cosine lr, EMA 0.999"}
    raise ConfigError(f"model.family: the project trains its own teachers only for 'toy2d' and 'digits', "
                      f"got {cfg.model.family!r} (set model.pretrained for the large families)")


def cache_dir(cfg: Config) -> Path:
    if cfg.model.teacher_cache:
        return Path(cfg.model.teacher_cache).expanduser()
    return Path(os.path.expanduser("~")) / ".cache" / "piflow" / "teachers"


def teacher_path(cfg: Config) -> Path:
    """The cached toy2d teacher (one safetensors file); the digits teacher lives at `model.pretrained`."""
    spec = teacher_spec(cfg)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir(cfg) / f"{spec['family']}-{key}.safetensors"


def ensure_teacher(cfg: Config, force: bool = False, progress: bool = True) -> Path:
    """Return the cached teacher's path, training (and caching) it first when absent or when `force`."""
    if cfg.model.family == "digits":
        return _ensure_digits_teacher(cfg, force, progress)
    path = teacher_path(cfg)
    if path.exists() and not force:
        return path
    # Training seeds and draws from the global RNG: fork it, so a run that trains its teacher first draws the
    # same numbers afterwards as a run that loads the cached one.
    with torch.random.fork_rng(devices=[]):
        net = train_toy_teacher(cfg, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    meta = {k: str(v) for k, v in teacher_spec(cfg).items()}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a half-written file never looks like a cached teacher
    return path


def _ensure_digits_teacher(cfg: Config, force: bool, progress: bool) -> Path:
    """The digits teacher lives at `model.pretrained` (the demo commits it under assets/): reused when its
    recorded spec matches the config, trained there when absent or with `force`, an error when it differs."""
    if not cfg.model.pretrained:
        raise ConfigError("model.pretrained: the digits family needs the teacher directory (e.g. "
                          "assets/teachers/digits); `piflow teacher CONFIG` trains it there")
    path = Path(cfg.model.pretrained)
    record = path / "teacher.json"  # written last: its presence marks a complete teacher
    if record.exists() and not force:
        found = json.loads(record.read_text()).get("spec")
        wanted = json.loads(json.dumps(teacher_spec(cfg)))
        if found != wanted:
            changed = sorted(k for k in set(found or {}) | set(wanted) if (found or {}).get(k) != wanted.get(k))
            raise ConfigError(f"model.pretrained: the teacher at {path} was trained with a different spec "
                              f"({', '.join(changed)} differ); retrain it with `piflow teacher CONFIG --force`")
        return path
    from trainer.teachers.digits import train_digits_teacher

    # Training seeds and draws from the global RNG: fork it (see below).
    with torch.random.fork_rng(devices=[]):
        return train_digits_teacher(cfg, path, progress=progress)  # replaces `path` atomically


def load_teacher(cfg: Config, progress: bool = True):
    """The frozen teacher network (toy2d: ToyVelocityNet), trained first if not cached."""
    from models.families.toy2d import ToyVelocityNet

    path = ensure_teacher(cfg, progress=progress)
    net = ToyVelocityNet(cfg.model.hidden_dim, cfg.model.num_layers)
    try:
        net.load_state_dict(load_file(str(path)))
    except (RuntimeError, OSError) as e:
        raise RuntimeError(f"cached teacher {path} does not load ({e}); rerun with `piflow teacher --force`") from e
    return net.eval().requires_grad_(False)


def build_teacher(cfg: Config, family, progress: bool = True):
    """The family's frozen teacher callable. The project's own teachers (toy2d) are loaded from the cache
    (trained first if absent); the large families load `model.pretrained` themselves."""
    if cfg.model.family == "toy2d":
        return family.build_teacher(cfg, load_teacher(cfg, progress=progress))
    return family.build_teacher(cfg)


def train_toy_teacher(cfg: Config, progress: bool = True):
    """Flow matching on fresh mixture samples every iteration; cosine lr; an EMA (0.999) of the weights is
    returned, which lowers the velocity error at the data's noise floor."""
    from models.families.toy2d import ToyMixture, ToyVelocityNet, flow_matching_loss

    m = cfg.model
    gen = torch.Generator().manual_seed(m.teacher_seed)
    torch.manual_seed(m.teacher_seed)
    net = ToyVelocityNet(m.hidden_dim, m.num_layers)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=m.teacher_lr, weight_decay=0.0)
    total = max(m.teacher_iters, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: min(1.0, (it + 1) / 200) * 0.5 * (1 + math.cos(math.pi * it / total)))
    mixture = ToyMixture.default()
    bar = tqdm(range(m.teacher_iters), desc="teacher (flow matching)", disable=not progress, mininterval=1.0)
    for it in bar:
        loss = flow_matching_loss(net, mixture.sample(m.teacher_batch_size, gen), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(0.999, (1 + it) / (10 + it))
            for k, v in net.state_dict().items():
                ema[k].lerp_(v, 1 - decay)
        if it % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    net.load_state_dict(ema)
    return net.eval().requires_grad_(False)
