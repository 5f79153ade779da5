"""Validation on the teacher group (issue 13): the fixed validation prompts are encoded ONCE, by an actor that
holds the text encoders, and the rollouts' final latents are decoded there by the family's VAE. Student ranks
receive the conditioning and a decode handle; no rank loads a text encoder or a VAE.

`ValidationServer` is that actor's class; `TeacherServer` inherits it, so in separate placement the first
teacher replica does this work on the teacher's device; in shared placement (no teacher group) the launcher
starts one `ValidationServer` actor. `RemoteValidation` is the ranks' client, a plain object for the trainer.

Issue 21: the shared-placement actor takes resources of its own (`eval.validation_gpus` GPUs when the run has
GPUs, counted by the resource preflight, cluster/capacity.py) and uses CUDA only when Ray gave it a GPU (before,
it reserved none but picked `cuda`, so its fp32 VAE decode landed on a student rank's GPU). It is restarted when
lost (`teacher.max_restarts`), and a lost one never fails a training rank: `RemoteValidation.decode` retries
once on the restarted actor, then returns None (the preview shows latent channels) with a warning.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)


def actor_device(device: Optional[str] = None) -> torch.device:
    """`device`, else CUDA only when this process was given a GPU: inside Ray, the GPUs Ray assigned it (an
    actor without one sees every GPU of its node, the student ranks' among them); outside Ray, any."""
    if device:
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    import ray

    if ray.is_initialized():
        return torch.device("cuda" if ray.get_gpu_ids() else "cpu")
    return torch.device("cuda")


class ValidationServer:
    """Text encoders and VAE of the run's base model, loaded on first use."""

    def __init__(self, cfg_dict: dict, device: Optional[str] = None):
        from models.families import get_family
        from trainer.config import config_from_dict

        from trainer.weights import with_local_weights

        self.cfg = with_local_weights(config_from_dict(cfg_dict, source="<ValidationServer>"))  # hub ids: this node's cache
        self.family = get_family(self.cfg.model.family)
        self.device = actor_device(device)
        self._encoder = self._vae = None
        self._vae_loaded = False
        self.calls = {"encode": 0, "decode": 0}

    def encode(self, prompts: list[str]) -> Optional[dict]:
        """Prompts -> conditioning dict on the CPU (for transport), or None for families without prompts."""
        from models.families import load_text_encoder

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
    only for other prompts); `decode(x0)` runs on the actor (rank 0 calls it). A lost actor is asked again once
    (Ray restarts it); if that fails too, `decode` returns None: validation is never worth a training rank."""

    def __init__(self, actor: Any, prompts: list[str], cond: Optional[dict], timeout_s: float = 600.0):
        self.actor, self.prompts, self.cond, self.timeout_s = actor, list(prompts), cond, timeout_s

    def _call(self, method: str, *args: Any) -> Any:
        """The actor's `method`; while Ray restarts a lost actor (ActorUnavailableError) the call is repeated
        for up to `timeout_s`; a call lost with the actor (ActorDiedError) or hung is tried once more."""
        import time

        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        deadline = time.monotonic() + (self.timeout_s or 600.0)
        retried = False
        while True:
            try:
                return ray.get(getattr(self.actor, method).remote(*args), timeout=self.timeout_s or None)
            except ActorUnavailableError:  # restarting: ask again shortly
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
            except (RayActorError, GetTimeoutError) as e:  # lost or hung: Ray restarts it (max_restarts)
                if retried:
                    raise
                retried = True
                log.warning("validation actor: %s failed (%s); asking the restarted actor once more", method,
                            type(e).__name__)

    def encode(self, prompts: list[str]) -> Optional[dict]:
        return self.cond if list(prompts) == self.prompts else self._call("encode", list(prompts))

    def decode(self, x0: torch.Tensor) -> Optional[torch.Tensor]:
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            return self._call("decode", x0.detach().float().cpu())
        except (RayActorError, GetTimeoutError) as e:
            log.warning("validation actor lost (%s): this preview shows latent channels; training goes on",
                        type(e).__name__)
            return None


def validation_options(cfg) -> dict[str, Any]:
    """Ray options of the shared-placement validation actor: its own CPUs and GPU (`eval.validation_gpus` when
    the run has GPUs; cluster/capacity.py counts the same bundle), restarted when lost."""
    from cluster.capacity import validation_bundle

    bundle = validation_bundle(cfg)
    opts: dict[str, Any] = {"num_cpus": bundle.pop("CPU", 0.0), "num_gpus": bundle.pop("GPU", 0.0),
                            "max_restarts": cfg.teacher.max_restarts}
    if bundle:
        opts["resources"] = bundle
    return opts


def start_validation(cfg, teacher_servers: Optional[list]) -> Optional[dict]:
    """When `eval.every` is on: the actor (teacher replica 0, or a new ValidationServer in shared placement)
    and the validation prompts' conditioning, encoded once. Returns {"actor", "prompts", "cond"} or None."""
    import ray

    from trainer.evaluation.rollouts import validation_prompts

    if not cfg.eval.every:
        return None
    if teacher_servers:
        actor = teacher_servers[0]
    else:  # shared placement: every student GPU trains; the encoders and VAE get an actor (and a GPU) of their own
        actor = ray.remote(ValidationServer).options(**validation_options(cfg)).remote(cfg.to_dict())
    prompts = validation_prompts(cfg)
    cond = ray.get(actor.encode.remote(prompts)) if prompts else None
    return {"actor": actor, "prompts": prompts, "cond": cond, "own": not teacher_servers}
