"""The exported pi-Flow student as a diffusers pipeline: `PiFlowPipeline.from_pretrained(DIR)` and
`pipe(prompt, num_inference_steps=4)`.

One class for every family, parameterised by the family adapter (`models.families.get_family`), which knows
how to build the student, encode prompts and decode latents. An export directory (written by
`trainer/export/pipeline.py`, or by `pipe.save_pretrained`) holds:

    model_index.json                      {"_class_name": "PiFlowPipeline", "student": ["models.pipeline", "PiFlowStudent"]}
    student/config.json                   the run's config (model, policy, distill, lora, ...) and the export kind
    student/diffusion_pytorch_model.safetensors
        kind "full": every student tensor;  kind "lora": only the trained tensors (LoRA A/B, policy head, the
        kept output norm), the base transformer comes from the reference `model.pretrained` (or the seeded tiny
        construction of `model.tiny`). Metadata: format, kind, family, policy and distill settings, base model.

Sampling is `models.sampling.sample` (the training-time sampler): for the same noise the pipeline returns the
same latents as validation rollouts. Text encoders and the VAE come from the base model reference, loaded
on first use.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any, Literal, Optional, Union

import torch
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import register_to_config

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
FORMAT = "piflow-student-v1"


def config_namespace(data: Any) -> Any:
    """A run-config dict as attribute access (cfg.model.family), what the family adapters read; models/ does
    not import the trainer's typed config."""
    if isinstance(data, dict):
        return SimpleNamespace(**{k: config_namespace(v) for k, v in data.items()})
    return data


def inference_device(spec: str = "auto", cuda_count: Optional[int] = None) -> torch.device:
    """The device of `piflow sample --device` and the evaluation actors: "auto" = the first GPU when there is one,
    else the CPU; "cpu"; "cuda" or "cuda:N" (an error naming the option when this machine has no such GPU).
    `cuda_count`: the visible GPUs (default: torch's count)."""
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda", 0) if count > 0 else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = spec.partition(":")[2]
        if index and not index.isdigit():
            raise ValueError(f"--device {spec}: expected cuda:N with N a GPU index")
        n = int(index or 0)
        if n >= count:
            raise ValueError(f"--device {spec}: this machine has {count} visible CUDA GPU(s); use --device cpu or "
                             "auto")
        return torch.device("cuda", n)
    raise ValueError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")


def base_model_reference(piflow: dict) -> str:
    model = piflow["model"]
    return model["pretrained"] or f"tiny:{model['family']}:seed={piflow['run']['seed']}"


class PiFlowStudent(ModelMixin, ConfigMixin):
    """The student network of any family, built from the run config; `.student.make_policy(x, sigma, cond)`."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, piflow: dict, kind: Literal["full", "lora"] = "full",
                 transformer_config: Optional[dict] = None):
        super().__init__()
        if kind not in ("full", "lora"):
            raise ValueError(f"PiFlowStudent: kind must be 'full' or 'lora', got {kind!r}")
        self.cfg = config_namespace(piflow)
        self.student = build_student(self.cfg, kind, transformer_config)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """What the export stores: all tensors (full) or the trained ones (lora)."""
        if self.config.kind == "full":
            return {k: v.detach().contiguous() for k, v in self.student.state_dict().items()}
        return {n: p.detach().contiguous() for n, p in self.student.named_parameters() if p.requires_grad}

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs) -> None:
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        self.save_config(save_directory)
        piflow = self.config.piflow
        metadata = {"format": FORMAT, "kind": self.config.kind, "family": piflow["model"]["family"],
                    "policy": json.dumps(piflow["policy"]), "distill": json.dumps(piflow["distill"]),
                    "base_model": base_model_reference(piflow)}
        save_file(self.trained_state_dict(), os.path.join(save_directory, WEIGHTS_NAME), metadata=metadata)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], subfolder: str = "",
                        **kwargs) -> "PiFlowStudent":
        """Build from config.json, then load the weights. A LoRA export must cover exactly the trainable
        tensors; the base's come from the reference. Extra diffusers loading kwargs are accepted and unused
        (torch_dtype is applied)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        root = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        with open(os.path.join(root, cls.config_name)) as f:
            config = json.load(f)
        model = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
        path = os.path.join(root, WEIGHTS_NAME)
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("format") != FORMAT:
                raise ValueError(f"{path}: not a piflow student export (metadata format != {FORMAT})")
        state = load_file(path)
        expected = set(model.trained_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{path}: tensors do not match the student built from config.json: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
        model.student.load_state_dict(state, strict=model.config.kind == "full")
        dtype = kwargs.get("torch_dtype")
        if dtype is not None:
            model.to(dtype)
        return model.eval()


def build_student(cfg: Any, kind: str, transformer_config: Optional[dict]) -> torch.nn.Module:
    """The family's student module with placeholder or base weights (the export's tensors are loaded next)."""
    from models.families import get_family

    family = get_family(cfg.model.family)
    if cfg.model.family == "toy2d":
        from models.families.toy2d import ToyVelocityNet

        # a full export overwrites every tensor, so the trunk it copies only provides the layout
        return family.build_student(cfg, ToyVelocityNet(cfg.model.hidden_dim, cfg.model.num_layers))
    if kind == "full" and transformer_config is not None:
        network = family.network_class(transformer_config).from_config(transformer_config)
    else:
        network = family.load_network(cfg)  # the base reference: model.pretrained, or seeded tiny
    return family.build_student(cfg, teacher=None, network=network)


def load_vae(cfg: Any, device: Any = "cpu"):
    """The base model's VAE (the family's class, from `model.pretrained`/vae) on `device`, eval mode; None when the
    base has none (toy families, tiny models, a local dir without a `vae` folder)."""
    from models.families import get_family

    if cfg.model.family == "toy2d":
        return None
    vae = get_family(cfg.model.family).load_vae(cfg)
    return None if vae is None else vae.to(device)


class PiFlowPipeline(DiffusionPipeline):
    """Few-step generation with an exported pi-Flow student (PIFLOW.md §4.1)."""

    model_cpu_offload_seq = "student"

    def __init__(self, student: PiFlowStudent):
        super().__init__()
        self.register_modules(student=student)
        self._encoder = None
        self._encoder_device = None
        self._vae = None

    @classmethod
    def from_student(cls, student: PiFlowStudent) -> "PiFlowPipeline":
        return cls(student=student)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> "PiFlowPipeline":
        """This project's reader of an export: `student/` only. model_index.json may describe the standalone
        diffusers pipeline shipped beside it (trainer/export/pipeline.py), which this class does not need."""
        return cls(student=PiFlowStudent.from_pretrained(pretrained_model_name_or_path, subfolder="student",
                                                         **kwargs))

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs) -> None:
        """model_index.json (the student's library is this module, not the top-level package) + student/."""
        os.makedirs(save_directory, exist_ok=True)
        from diffusers import __version__

        index = {"_class_name": type(self).__name__, "_diffusers_version": __version__,
                 "student": ["models.pipeline", "PiFlowStudent"]}
        with open(os.path.join(save_directory, "model_index.json"), "w") as f:
            json.dump(index, f, indent=1)
        self.student.save_pretrained(os.path.join(save_directory, "student"))

    # ---- the base model's prompt encoder and VAE, on first use
    @property
    def family(self):
        from models.families import get_family

        return get_family(self.student.cfg.model.family)

    def encode_prompt(self, prompts: list[str]) -> Optional[dict[str, torch.Tensor]]:
        cfg = self.student.cfg
        if cfg.model.family == "toy2d":
            return None
        from models.families import load_text_encoder
        from models.text_encoders import encoder_to

        if self._encoder is None:
            self._encoder, self._encoder_device = load_text_encoder(cfg), torch.device("cpu")
        if self._encoder_device != self.device:  # the encoders run where the student runs (its GPU)
            self._encoder, self._encoder_device = encoder_to(self._encoder, self.device), self.device
        return {k: v.to(self.device) for k, v in self._encoder(prompts).items()}

    def vae(self):
        """The base model's VAE (`model.pretrained`/vae), or None when the base has none (tiny models)."""
        if self._vae is None:
            self._vae = load_vae(self.student.cfg, self.device)
        elif self._vae.device != self.device:
            self._vae.to(self.device)
        return self._vae

    def prepare_latents(self, batch_size: int, generator: Optional[Union[torch.Generator, list]] = None,
                        latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, C, H, W) float32 noise; a list of generators gives sample i its own (as validation rollouts do)."""
        if latents is not None:
            return latents.to(self.device, torch.float32)
        shape = tuple(self.family.latent_shape(self.student.cfg))
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
            noise = torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generator])
        else:
            noise = torch.randn((batch_size, *shape), generator=generator,
                                device=generator.device if generator is not None else "cpu")
        # drawn where the generator lives (a CPU generator gives the same noise whatever the student's device);
        # `self.device` is the student's (DiffusionPipeline.device: its only module)
        return noise.to(self.device)

    @torch.no_grad()
    def __call__(self, prompt: Union[str, list[str], None] = None, num_inference_steps: Optional[int] = None,
                 generator: Optional[Union[torch.Generator, list]] = None, num_images: int = 1,
                 latents: Optional[torch.Tensor] = None, total_substeps: Optional[float] = None,
                 temperature: Union[str, float] = "auto", h: float = 0.0,
                 output_type: Literal["latent", "pt", "pil"] = "latent"):
        """Generate: `num_inference_steps` student evaluations (default: the distilled NFE). Returns latents
        (B, C, H, W) for 'latent'; decoded images in [0, 1] (B, 3, H', W') for 'pt' (video families:
        (B, 3, F, H', W')); PIL images (video: a list of frames per sample) for 'pil' (those two need the VAE)."""
        from models.sampling import sample

        cfg = self.student.cfg
        d = cfg.distill
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        batch = len(prompts) * num_images if prompts else num_images
        prompts = [p for p in prompts for _ in range(num_images)]
        cond = self.encode_prompt(prompts) if prompts else self.encode_prompt([""] * batch)
        noise = self.prepare_latents(batch, generator, latents)
        student = self.student.student
        x0 = sample(lambda x, sigma: student.make_policy(x, sigma, cond), noise,
                    num_inference_steps or d.nfe, d.final_step_scale, d.shift, total_substeps or d.total_substeps,
                    temperature=temperature, h=h, generator=generator if isinstance(generator, torch.Generator)
                    else None)
        if output_type == "latent":
            return x0
        vae = self.vae()
        if vae is None and not self.family.uses_vae:  # the latents are the images (digits)
            images = (self.family.decode(None, x0, cfg=cfg) + 1) / 2
        elif vae is None:
            raise ValueError(f"output_type={output_type!r} needs the base model's VAE; this export's base "
                             f"({base_model_reference(self.student.config.piflow)}) has none: use 'latent'")
        else:
            images = (self.family.decode(vae, x0, cfg=cfg).clamp(-1, 1) + 1) / 2  # (B, 3, H', W') in [0, 1]
        if output_type == "pt":
            return images
        from PIL import Image

        if images.dim() == 5:  # video families: (B, 3, F, H, W) -> a list of frames per sample
            frames = (images.permute(0, 2, 3, 4, 1) * 255).round().to(torch.uint8).cpu().numpy()
            return [[Image.fromarray(f) for f in clip] for clip in frames]
        arrays = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]  # 1 channel: grey
