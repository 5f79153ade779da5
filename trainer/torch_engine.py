"""The single-process torch engine (`train.engine: torch`: toy runs, the digits demo, CPU tests) and what both
engines share: the LR warm-up, delayed clipping, the non-finite step guard's kinds, the checkpoint slot layout
and the activation-checkpointing check. The DeepSpeed ZeRO-3 engine and `build_engine` are in trainer/engine.py
(the only module that imports deepspeed); the interface both implement is described there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from trainer.config import Config


def lr_factor(cfg: Config, step: int) -> float:
    """Constant LR after a linear warm-up from `warmup_start_factor` (PIFLOW.md §5). `step` counts from 0."""
    warm = cfg.optim.warmup_iters
    if warm <= 0 or step >= warm:
        return 1.0
    start = cfg.optim.warmup_start_factor
    return start + (1.0 - start) * step / warm


def apply_lr(cfg: Config, optimizer: torch.optim.Optimizer, step: int) -> float:
    """Write the scheduled LR of `step` into every param group; returns it."""
    lr = cfg.optim.lr * lr_factor(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def grad_clip_for(cfg: Config, step: int) -> float:
    """Global-norm clipping starts at `grad_clip_start` (PIFLOW.md §5); inf = no clipping."""
    if cfg.optim.grad_clip <= 0 or step < cfg.optim.grad_clip_start:
        return math.inf
    return cfg.optim.grad_clip


ADAM_STATES = ("exp_avg", "exp_avg_sq")  # the optimiser moments a checkpoint holds (torch AdamW names)
NONFINITE_KINDS = ("loss", "teacher", "grad_norm")  # what the loop's non-finite guard can report


@dataclass(frozen=True)
class Slot:
    """Where this rank's partition of one trained parameter lies: elements [start, start + length) of the
    flattened full tensor (numel elements, then zero padding up to the partition size under ZeRO-3)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    start: int
    length: int


class TorchEngine:
    """Single-process engine: torch AdamW, warm-up, delayed clipping."""

    def __init__(self, cfg: Config, module: torch.nn.Module):
        self.cfg = cfg
        self.module = module
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        if not self.params:
            raise ValueError("build_engine: the student has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
        )
        self.global_step = 0  # iterations done, skipped ones included (the LR schedule follows iterations)
        self.skipped_steps = 0  # iterations whose update was skipped (non-finite)
        self._set_lr()

    def _set_lr(self) -> float:
        return apply_lr(self.cfg, self.optimizer, self.global_step)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def any_rank(self, flag: bool) -> bool:
        return bool(flag)

    def step(self, nonfinite: Sequence[str] = ()) -> dict[str, Any]:
        lr = self._set_lr()
        max_norm = grad_clip_for(self.cfg, self.global_step)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        bad = set(nonfinite) | (set() if math.isfinite(grad_norm) else {"grad_norm"})
        reasons = [name for name in NONFINITE_KINDS if name in bad]
        if not reasons:
            self.optimizer.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return {"grad_norm": grad_norm, "lr": lr, "skipped": bool(reasons), "nonfinite": reasons}

    # ---- checkpoint state (world size 1: the partition is the whole tensor)
    def slots(self) -> list[Slot]:
        return [Slot(n, tuple(p.shape), p.numel(), 0, p.numel()) for n, p in self.named]

    def adam_step(self) -> int:
        steps = [int(st["step"]) for st in self.optimizer.state.values() if "step" in st]
        return max(steps, default=0)

    def local_state(self) -> dict[str, torch.Tensor]:
        """{"master/NAME", "exp_avg/NAME", "exp_avg_sq/NAME"}: flat fp32 copies (zeros before the first step)."""
        out = {}
        for n, p in self.named:
            out[f"master/{n}"] = p.detach().reshape(-1).float().clone()
            st = self.optimizer.state.get(p, {})
            for key in ADAM_STATES:
                out[f"{key}/{n}"] = st[key].reshape(-1).float().clone() if key in st else torch.zeros(p.numel())
        return out

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """Module tensors that are not trained (buffers, frozen weights): whole, this engine has one rank."""
        trained = {n for n, _ in self.named}
        return {k: v.detach().clone() for k, v in self.module.state_dict().items() if k not in trained}

    def counters(self) -> dict[str, int]:
        return {"global_step": self.global_step, "skipped_steps": self.skipped_steps, "adam_step": self.adam_step()}

    @torch.no_grad()
    def load_local_state(self, tensors: Mapping[str, torch.Tensor], counters: Mapping[str, int],
                         frozen: Mapping[str, torch.Tensor] | None = None) -> None:
        """Restore from flat partitions laid out as `slots()` (the checkpoint reader reshards into them)."""
        self.global_step, self.skipped_steps = int(counters["global_step"]), int(counters["skipped_steps"])
        adam_step = int(counters["adam_step"])
        for n, p in self.named:
            p.copy_(tensors[f"master/{n}"].view(p.shape).to(p.dtype))
            if adam_step > 0:
                self.optimizer.state[p] = {
                    "step": torch.tensor(float(adam_step)),
                    **{key: tensors[f"{key}/{n}"].view(p.shape).to(p.dtype).clone() for key in ADAM_STATES},
                }
            else:
                self.optimizer.state.pop(p, None)
        if frozen:
            self.module.load_state_dict(dict(frozen), strict=False)
        self._set_lr()

    @torch.no_grad()
    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params)


def checkpointed_models(module: torch.nn.Module) -> int:
    """How many diffusers/transformers models inside `module` run their blocks under activation checkpointing.

    Checkpointing is switched on in ONE place, where the student is built (`models.student`, for every engine);
    the engines only verify it here, so a config asking for it never trains silently without it."""
    return sum(1 for sub in module.modules()
               if getattr(sub, "_supports_gradient_checkpointing", False) and getattr(sub, "is_gradient_checkpointing",
                                                                                      False))


def verify_gradient_checkpointing(cfg: Config, module: torch.nn.Module) -> None:
    if cfg.model.gradient_checkpointing and checkpointed_models(module) == 0:
        raise ValueError(f"model.gradient_checkpointing: true, but no block of the student "
                         f"({type(module).__name__}) runs checkpointed: build it with the family's build_student, "
                         f"which turns checkpointing on")
