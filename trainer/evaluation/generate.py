"""Paired generation for `piflow eval`: the student (few steps) and its teacher (Euler, many and few steps) from
the same noise per (prompt, seed); the teacher's latents cached on disk by (prompt, seed, steps), so reruns and
other students of the same teacher only generate what is new. No ray here: cluster/jobs/eval.py spreads
`Generator` instances over actors."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def pair_seed(prompt: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{prompt}".encode(), digest_size=8).digest(), "little") >> 1


def cache_key(prompt: str, seed: int, steps: int, teacher_id: str) -> str:
    return hashlib.sha256(f"{teacher_id}|{steps}|{seed}|{prompt}".encode()).hexdigest()[:32]


def teacher_euler(teacher, noise: torch.Tensor, cond, steps: int, shift: float) -> torch.Tensor:
    """The teacher's own Euler sampler on the uniform raw-time grid warped by `shift` (PIFLOW.md §1.2)."""
    from models.timesteps import warp

    sigmas = warp(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float().to(noise.device)
    x = noise.clone()
    with torch.no_grad():
        for i in range(steps):
            x = x + teacher(x, sigmas[i].expand(len(x)), cond) * (sigmas[i + 1] - sigmas[i])
    return x


class Generator:
    """Loads an exported student (PiFlowPipeline) and its teacher once; generates latents per (prompt, seed)."""

    def __init__(self, export_dir: str, cache_dir: Optional[str] = None, device: torch.device | str = "cpu"):
        from models.families import get_family
        from models.pipeline import PiFlowPipeline

        self.device = torch.device(device)  # student, teacher, text encoders and VAE; latents return on the CPU
        self.pipe = PiFlowPipeline.from_pretrained(export_dir).to(self.device)
        self.cfg = self.pipe.student.cfg
        self.family = get_family(self.cfg.model.family)
        self._teacher = None
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.teacher_id = self.cfg.model.pretrained or f"tiny-{self.cfg.model.family}-seed{self.cfg.run.seed}"

    def noise(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        shape = self.family.latent_shape(self.cfg)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(pair_seed(p, s)))
                            for p, s in zip(prompts, seeds)])

    def student(self, prompts: list[str], seeds: list[int], nfe: int) -> torch.Tensor:
        return self.pipe(prompts, num_inference_steps=nfe, latents=self.noise(prompts, seeds), temperature=1.0,
                         output_type="latent").cpu()

    def teacher(self, prompts: list[str], seeds: list[int], steps: int) -> tuple[torch.Tensor, int]:
        """Teacher latents (cached ones loaded, the rest generated and cached); returns (latents, generated)."""
        keys = [cache_key(p, s, steps, self.teacher_id) for p, s in zip(prompts, seeds)]
        out: list[Optional[torch.Tensor]] = [self._load(k) for k in keys]
        todo = [i for i, x in enumerate(out) if x is None]
        if todo:
            if self._teacher is None:
                self._teacher = self.family.build_teacher(self.cfg).to(self.device)
            ps, ss = [prompts[i] for i in todo], [seeds[i] for i in todo]
            x = teacher_euler(self._teacher, self.noise(ps, ss).to(self.device), self.pipe.encode_prompt(ps), steps,
                              self.cfg.distill.shift).cpu()
            for i, xi in zip(todo, x):
                out[i] = xi
                self._save(keys[i], xi)
        return torch.stack(out), len(todo)

    def _load(self, key: str) -> Optional[torch.Tensor]:
        if self.cache_dir is None or not (self.cache_dir / f"{key}.npy").exists():
            return None
        return torch.from_numpy(np.load(self.cache_dir / f"{key}.npy", allow_pickle=False))

    def _save(self, key: str, x: torch.Tensor) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, x.float().numpy(), allow_pickle=False)
        tmp = self.cache_dir / f".{key}.tmp"
        tmp.write_bytes(buf.getvalue())
        tmp.replace(self.cache_dir / f"{key}.npy")

    def images(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (N, C, H, W) in [0, 1]."""
        if not self.family.uses_vae:
            return ((self.family.decode(None, latents) + 1) / 2).clamp(0, 1)
        vae = self.pipe.vae()
        if vae is None:
            raise ValueError("this export's base model has no VAE: images cannot be decoded for evaluation")
        return ((self.family.decode(vae, latents.to(self.device)).clamp(-1, 1) + 1) / 2).cpu()
