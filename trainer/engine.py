"""The optimisation engine: the only module that imports deepspeed.

`build_engine(cfg, module)` returns an object with one small interface, so the loop does not care whether
it runs a plain single-process torch optimiser (`train.engine: torch`, toy runs) or a DeepSpeed ZeRO-3
engine (`train.engine: deepspeed`):

    engine.module            the (possibly wrapped) trainable module; call it for the forward
    engine.backward(loss)    accumulate gradients of one segment's loss
    engine.step() -> dict    clip, optimiser step, LR schedule, zero grads; returns {"grad_norm", "lr"}
    engine.state_dict() / engine.load_state_dict(sd)     (torch engine; DeepSpeed saves its own shards)
"""
from __future__ import annotations

import math
from typing import Any

import torch

from trainer.config import Config


def lr_factor(cfg: Config, step: int) -> float:
    """Constant LR after a linear warm-up from `warmup_start_factor` (PIFLOW.md §5). `step` counts from 0."""
    warm = cfg.optim.warmup_iters
    if warm <= 0 or step >= warm:
        return 1.0
    start = cfg.optim.warmup_start_factor
    return start + (1.0 - start) * step / warm


def grad_clip_for(cfg: Config, step: int) -> float:
    """Global-norm clipping starts at `grad_clip_start` (PIFLOW.md §5); inf = no clipping."""
    if cfg.optim.grad_clip <= 0 or step < cfg.optim.grad_clip_start:
        return math.inf
    return cfg.optim.grad_clip


class TorchEngine:
    """Single-process engine: torch AdamW, warm-up, delayed clipping."""

    def __init__(self, cfg: Config, module: torch.nn.Module):
        self.cfg = cfg
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("build_engine: the student has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
        )
        self.global_step = 0
        self._set_lr()

    def _set_lr(self) -> float:
        lr = self.cfg.optim.lr * lr_factor(self.cfg, self.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> dict[str, float]:
        lr = self._set_lr()
        max_norm = grad_clip_for(self.cfg, self.global_step)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return {"grad_norm": float(grad_norm), "lr": lr}

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "global_step": self.global_step}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.module.load_state_dict(sd["module"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.global_step = int(sd["global_step"])
        self._set_lr()


def build_engine(cfg: Config, module: torch.nn.Module):
    if cfg.train.engine == "torch":
        return TorchEngine(cfg, module)
    raise NotImplementedError("train.engine: deepspeed is added by the distributed trainer (issue 4)")
