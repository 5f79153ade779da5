"""Validation on the teacher group (issue 13): the fixed validation prompts are encoded ONCE, by an actor that
holds the text encoders, and the rollouts' final latents are decoded there by the family's VAE. Student ranks
receive the conditioning and a decode handle; no rank loads a text encoder or a VAE.

`ValidationServer` is that actor's class; `TeacherServer` inherits it, so in separate placement the first
teacher replica does this work on the teacher's device; in shared placement (no teacher group) the launcher
starts one `ValidationServer` actor. `RemoteValidation` is the ranks' client, a plain object for the trainer.
"""
from __future__ import annotations

from typing import Any, Optional

import torch


class ValidationServer:
    """Text encoders and VAE of the run's base model, loaded on first use."""

    def __init__(self, cfg_dict: dict, device: Optional[str] = None):
        from models.families import get_family
        from trainer.config import config_from_dict

        from trainer.weights import with_local_weights

        self.cfg = with_local_weights(config_from_dict(cfg_dict, source="<ValidationServer>"))  # hub ids: this node's cache
        self.family = get_family(self.cfg.model.family)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._encoder = self._vae = None
        self._vae_loaded = False
        self.calls = {"encode": 0, "decode": 0}

    def encode(self, prompts: list[str]) -> Optional[dict]:
        """Prompts -> conditioning dict on the CPU (for transport), or None for families without prompts."""
        from models.text_encoders import load_text_encoder

        if self.cfg.model.family == "toy2d":
            return None
        if self._encoder is None:
            self._encoder = load_text_encoder(self.cfg)
        self.calls["encode"] += 1
        with torch.no_grad():
            return {k: v.detach().cpu() for k, v in self._encoder(prompts).items()}

    def decode(self, x0: torch.Tensor) -> Optional[torch.Tensor]:
        """Final latents (N, C, H, W) -> images (N, 3, H', W') in [-1, 1] on the CPU; None when the base model
        has no VAE (tiny models without a `vae` folder: previews then show latent channels)."""
        from models.pipeline import load_vae

        if not self._vae_loaded:
            self._vae, self._vae_loaded = load_vae(self.cfg, self.device), True
        self.calls["decode"] += 1
        with torch.no_grad():
            if self._vae is None:
                return None if self.family.uses_vae else self.family.decode(None, x0.float()).cpu()
            # cfg: a video family needs the frame count (found by rehearsing the Wan recipe)
            return self.family.decode(self._vae, x0.to(self.device, torch.float32), cfg=self.cfg).clamp(-1, 1).cpu()

    def validation_calls(self) -> dict[str, int]:
        return dict(self.calls)

    def ping(self) -> bool:
        return True


class RemoteValidation:
    """A rank's handle: `encode(prompts)` returns the conditioning encoded once by the launcher (asks the actor
    only for other prompts); `decode(x0)` runs on the actor (rank 0 calls it)."""

    def __init__(self, actor: Any, prompts: list[str], cond: Optional[dict]):
        self.actor, self.prompts, self.cond = actor, list(prompts), cond

    def encode(self, prompts: list[str]) -> Optional[dict]:
        import ray

        return self.cond if list(prompts) == self.prompts else ray.get(self.actor.encode.remote(list(prompts)))

    def decode(self, x0: torch.Tensor) -> Optional[torch.Tensor]:
        import ray

        return ray.get(self.actor.decode.remote(x0.detach().float().cpu()))


def start_validation(cfg, teacher_servers: Optional[list]) -> Optional[dict]:
    """When `eval.every` is on: the actor (teacher replica 0, or a new ValidationServer in shared placement)
    and the validation prompts' conditioning, encoded once. Returns {"actor", "prompts", "cond"} or None."""
    import ray

    from trainer.rollouts import validation_prompts

    if not cfg.eval.every:
        return None
    if teacher_servers:
        actor = teacher_servers[0]
    else:  # shared placement: every GPU trains; the encoders and VAE get an actor of their own
        actor = ray.remote(ValidationServer).options(num_cpus=cfg.teacher.cpus_per_replica).remote(cfg.to_dict())
    prompts = validation_prompts(cfg)
    cond = ray.get(actor.encode.remote(prompts)) if prompts else None
    return {"actor": actor, "prompts": prompts, "cond": cond, "own": not teacher_servers}
