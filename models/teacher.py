"""The frozen teacher: guided velocity u_teacher(x_t, sigma, cond) (PIFLOW.md §1.3).

CFG runs cond and uncond in ONE batched forward: u = u_neg + g (u_pos - u_neg), with g = guidance.scale where
sigma lies in guidance.interval and 1 elsewhere (per sample). Embedded guidance (FLUX) is a network input the
family adds; it needs no second pass. Always no_grad, eval mode, float32 out whatever the weights' dtype.

A call of N queries (pi-ID sends all n_int x B queries of a segment at once) runs as ceil(N / micro_batch)
network forwards of at most `teacher.micro_batch` queries each (0 = one forward), CFG's two branches inside
each: the number of forwards depends on N alone, never on the sigmas, so ZeRO-3 ranks sharing the trunk
(shared placement) always run the same number of forwards. `forwards` counts them.
"""
from __future__ import annotations

import torch
from torch import nn

from models.types import Cond, Config, VelocityFn



def guidance_scale_per_sample(sigma: torch.Tensor, scale: float, interval: tuple[float, float]) -> torch.Tensor:
    """(B,) guidance: `scale` inside [lo, hi] (sigma units, inclusive), 1 outside."""
    lo, hi = interval
    inside = (sigma >= lo) & (sigma <= hi)
    return torch.where(inside, torch.full_like(sigma, scale), torch.ones_like(sigma))


def slice_cond(cond: Cond | None, start: int, stop: int) -> Cond | None:
    """Rows [start, stop) of every conditioning tensor (all have the batch first)."""
    return None if cond is None else {k: v[start:stop] for k, v in cond.items()}


class Teacher(nn.Module):
    """Callable `teacher(x_t (B,C,H,W), sigma (B,), cond) -> u (B,C,H,W) float32`, guided per the config.

    `velocity_fn` is the unguided single forward; by default the family's forward of `network`. A student in
    LoRA `shared` placement rebinds it to its own trunk with the adapters disabled (models/student.py).
    `family` is the models.families `Family` that builds it (not imported here: the families import this module).
    """

    def __init__(self, family, cfg: Config, network: nn.Module | None):
        super().__init__()
        self.family = family
        self.cfg = cfg
        self.network = network
        if network is not None:
            network.requires_grad_(False)
            network.eval()
        self.velocity_fn: VelocityFn = self._network_velocity
        self.forwards = 0  # network forwards run so far (the loop logs them per iteration)

    def _network_velocity(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.family.teacher_velocity(self.cfg, self.network, x_t, sigma, cond)

    def train(self, mode: bool = True) -> "Teacher":
        # A teacher never trains: keep the network in eval mode whatever a parent module asks.
        return super().train(False)

    @torch.no_grad()
    def unguided(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        self.forwards += 1
        return self.velocity_fn(x_t, sigma, cond).float()

    @torch.no_grad()
    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """u (N,C,H,W) float32 for N queries, in forwards of at most `teacher.micro_batch` queries."""
        sigma = sigma.reshape(-1).expand(x_t.shape[0]).float()
        N = x_t.shape[0]
        micro = getattr(self.cfg.teacher, "micro_batch", 0) or N
        if micro >= N:
            return self._guided(x_t, sigma, cond)
        return torch.cat([self._guided(x_t[i:i + micro], sigma[i:i + micro], slice_cond(cond, i, i + micro))
                          for i in range(0, N, micro)])

    def _guided(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """ONE network forward: unguided, or both CFG branches batched."""
        guidance = self.cfg.teacher.guidance
        if guidance.mode != "cfg":
            return self.unguided(x_t, sigma, cond)
        g = guidance_scale_per_sample(sigma, guidance.scale, guidance.interval)  # (B,)
        if bool((g == 1).all()):
            return self.unguided(x_t, sigma, cond)
        uncond = self.family.uncond(self.cfg, cond)
        if uncond is None:
            raise ValueError(f"teacher.guidance.mode=cfg but family {self.family.name!r} has no negative condition")
        both = self.family.cat_cond([cond, uncond])
        self.forwards += 1
        u = self.velocity_fn(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), both).float()
        u_pos, u_neg = u.chunk(2)
        g = g.view(-1, *([1] * (x_t.dim() - 1)))
        return u_neg + g * (u_pos - u_neg)
