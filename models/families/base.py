"""What a model family is: the small interface the rest of piflow needs, and the shared machinery of
diffusers-transformer families (FLUX, Qwen-Image, DiT).

A family owns everything model-specific (PIFLOW.md §1, §2.1, §3.7): how latents are packed into the network's
tokens, position ids, conditioning inputs, the guidance rule, the timestep convention and the VAE normalisation,
and which output layers the student replaces with a policy head. Everything outside works on un-packed latents
x (B, C, H, W), sigmas (B,) and a conditioning dict `cond` of tensors with a leading batch dimension.

`Family` is the whole interface (an MLP teacher such as toy2d implements it directly); `TransformerFamily`
implements most of it for diffusers transformers, so a new large teacher only writes the few hooks it marks
abstract (see "Adding a teacher" in the README).
"""
from __future__ import annotations

import abc
from typing import Callable

import torch
from torch import nn

from models.types import Cond, Config, OutputTap


class Family(abc.ABC):
    """The interface every family implements. Stateless: each method receives the config it needs."""

    name: str = ""
    uses_vae: bool = True  # False where the latents are the images themselves (digits): `decode(None, x)`

    @abc.abstractmethod
    def latent_shape(self, cfg: Config) -> tuple[int, int, int]:
        """(C, H, W) of the un-packed latent the policy works on."""

    @abc.abstractmethod
    def build_teacher(self, cfg: Config):
        """The frozen teacher: a `models.teacher.Teacher` (callable velocity(x_t, sigma, cond) -> u, guided)."""

    @abc.abstractmethod
    def build_student(self, cfg: Config, teacher=None):
        """The student: an nn.Module with `make_policy(x_src, sigma_src, cond) -> policy`."""

    @abc.abstractmethod
    def teacher_velocity(self, cfg: Config, network: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor,
                         cond: Cond) -> torch.Tensor:
        """ONE unguided network evaluation: x_t (B,C,H,W), sigma (B,) -> u (B,C,H,W) float32."""

    def encode_prompts(self, cfg: Config, prompts: list[str]) -> Cond:
        """Prompts -> conditioning dict (loads the encoders each call; data workers keep `load_text_encoder`)."""
        return self.load_text_encoder(cfg)(prompts)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the network's token layout. Identity for families that take images."""
        return x

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Inverse of `pack`."""
        return tokens

    def uncond(self, cfg: Config, cond: Cond) -> Cond | None:
        """The negative conditioning for CFG (same keys as `cond`), or None when the family has no CFG."""
        return None

    def cat_cond(self, conds: list[Cond]) -> Cond:
        """Concatenate conditioning dicts along the batch (families with ragged sequences pad here)."""
        keys = conds[0].keys()
        return {k: torch.cat([c[k] for c in conds], dim=0) for k in keys}

    def load_text_encoder(self, cfg: Config) -> Callable[[list[str]], Cond]:
        """The prompt encoder `prompts -> cond`: models.text_encoders holds those of the built-in families
        (FLUX, digits, Qwen-Image, DiT; an error for others); a new family overrides this in its own file."""
        from models.text_encoders import builtin_text_encoder

        return builtin_text_encoder(cfg)

    def load_vae(self, cfg: Config):
        """The base model's VAE (`model.pretrained`/vae), or None (tiny models, no `vae` folder)."""
        import os

        root = cfg.model.pretrained
        if not self.uses_vae or self.vae_class is None or not root:
            return None
        if os.path.isdir(root) and not os.path.isdir(os.path.join(root, "vae")):
            return None
        return self.vae_class.from_pretrained(root, subfolder="vae").eval()

    vae_class: type | None = None  # the diffusers VAE class of the base model

    def decode(self, vae, x: torch.Tensor, cfg: Config = None) -> torch.Tensor:
        """Policy latents (B, C, H, W) -> images (B, 3, H', W') in [-1, 1], or clips (B, 3, F, H', W') for video
        families (which need `cfg` for the frame count)."""
        raise NotImplementedError(f"family {self.name!r} does not decode latents")


def _get_module(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class TransformerFamily(Family):
    """Shared machinery for diffusers transformer teachers. A subclass provides:

    - `transformer_class`, `tiny_config(cfg)`, `patch_size(network)`
    - `network_inputs(cfg, network, x_t, sigma, cond) -> kwargs` for `network(**kwargs, return_dict=False)`
    - `pack` / `unpack` (the network's token layout; DiT: the layout of `proj_out_2`'s features)
    - `output_modules`: the names the student removes, the first one tapped for its inputs
    - `head_inputs(tail, taps, network) -> (hidden (B,T,D), temb (B,E))` and `teacher_tokens(tail, taps, network)`
    """

    transformer_class: type
    public_config: dict | None = None  # the released architecture (constructor kwargs): `piflow plan` on meta
    output_modules: tuple[str, ...] = ("norm_out", "proj_out")
    proj_module: str = "proj_out"  # the final linear replicated into the policy head (PIFLOW.md §2.2)

    # ---- hooks a family writes
    @abc.abstractmethod
    def tiny_config(self, cfg: Config) -> dict:
        """Constructor kwargs of a tiny randomly initialised transformer (tests, CPU demos)."""

    @abc.abstractmethod
    def network_inputs(self, cfg: Config, network: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor,
                       cond: Cond) -> dict:
        """Keyword arguments of one network call at (x_t (B,C,H,W) float32, sigma (B,))."""

    @abc.abstractmethod
    def patch_size(self, network: nn.Module) -> int:
        ...

    def network_class(self, config: dict) -> type:
        """The transformer class of a saved config.json (a family may accept several; DiT does)."""
        return self.transformer_class

    def pretrained_class(self, cfg: Config) -> type:
        """The class of `model.pretrained`'s transformer, after the family's checks on the saved configs (DiT
        refuses epsilon-prediction checkpoints); every path that loads a teacher from disk asks this first."""
        return self.transformer_class

    def output_to_velocity(self, out: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """The network's raw output -> u (B,C,H,W) float32. Default: the output is tokens."""
        return self.tokens_to_velocity(out, x_t)

    def tokens_to_velocity(self, tokens: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """Output tokens of the final projection -> u (B,C,H,W) float32."""
        return self.unpack(tokens, x_t.shape[-2], x_t.shape[-1]).float()

    def prepare_student_network(self, network: nn.Module) -> None:
        """Last adjustments of the student's trunk (e.g. DiT: no label dropout while distilling)."""

    def head_inputs(self, tail: nn.ModuleDict, taps: dict[str, OutputTap], network: nn.Module):
        """Default (FLUX, Qwen-Image): `norm_out` kept (trainable copy in `tail`), fed the tapped pre-norm
        hidden states and the conditioning embedding `temb` that the trunk passed to it."""
        hidden, temb = taps["norm_out"].pop()[:2]
        norm_out = tail["norm_out"]
        dtype = next(norm_out.parameters()).dtype  # fp32 copy on a bf16 trunk: compute it in its own dtype
        return norm_out(hidden.to(dtype), temb.to(dtype)), temb

    def teacher_tokens(self, tail: nn.ModuleDict, taps: dict[str, OutputTap], network: nn.Module) -> torch.Tensor:
        """The teacher's output tokens from the tapped trunk and the frozen original output layers."""
        hidden, temb = taps["norm_out"].pop()[:2]
        return tail["proj_out"](tail["norm_out"](hidden, temb))

    def student_tail_modules(self) -> tuple[str, ...]:
        """Removed output modules the student keeps (and trains) in front of its head."""
        return ("norm_out",)

    def lora_excluded_modules(self, network: nn.Module, targets: list[str]) -> list[str]:
        """Full module names never given LoRA (e.g. layers whose output nothing reads)."""
        return []

    def velocity_proj(self, proj: nn.Linear, num_channels: int) -> nn.Linear:
        """The rows of the final projection that produce velocity (all of them unless a family has extra
        outputs, like DiT's learned sigma)."""
        return proj

    # ---- the Family interface
    def latent_shape(self, cfg: Config) -> tuple[int, int, int]:
        m = cfg.model
        return (m.latent_channels, m.latent_frames * m.latent_size, m.latent_width or m.latent_size)

    def sequence_tokens(self, cfg: Config) -> int:
        """Tokens one sample puts through the transformer's self-attention (the planner's activation model):
        2x2-patch latent tokens plus the text tokens of joint-attention models (FLUX, Qwen-Image)."""
        _, H, W = self.latent_shape(cfg)
        return (H // 2) * (W // 2) + cfg.model.max_sequence_length

    def load_network(self, cfg: Config) -> nn.Module:
        """The teacher transformer: from a diffusers-format dir or hub id (`transformer` subfolder), or tiny; in
        `weights_dtype(cfg)`."""
        dtype = weights_dtype(cfg)
        if cfg.model.tiny:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.run.seed)
                network = self.transformer_class(**self.tiny_config(cfg))
            if dtype != torch.float32:
                network = network.to(dtype)
        elif cfg.model.pretrained:
            network = self.transformer_class.from_pretrained(
                cfg.model.pretrained, subfolder=cfg.model.subfolder or None, torch_dtype=dtype
            )
        else:
            raise ValueError(f"model.family={self.name}: set model.pretrained (a diffusers-format dir or hub id) "
                             "or model.tiny: true")
        return network

    def build_teacher(self, cfg: Config, network: nn.Module | None = None):
        from models.teacher import Teacher

        network = network if network is not None else self.load_network(cfg)
        prepare_network(network, cfg, training=False)
        return Teacher(self, cfg, network)

    def build_student(self, cfg: Config, teacher=None, network: nn.Module | None = None):
        from models.student import build_transformer_student

        student = build_transformer_student(self, cfg, teacher=teacher, network=network)
        prepare_network(student.transformer, cfg, training=True)  # the trunk; in shared placement the teacher's
        return student

    def teacher_velocity(self, cfg: Config, network: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor,
                         cond: Cond) -> torch.Tensor:
        out = network(**self.network_inputs(cfg, network, x_t, sigma, cond), return_dict=False)[0]
        return self.output_to_velocity(out, x_t)

    # ---- helpers shared by the student
    def channel_index(self, num_channels: int, patch: int) -> torch.Tensor:
        """Latent channel of every output feature of the final projection (for per-channel bias noise)."""
        x = torch.arange(num_channels, dtype=torch.float32).view(1, num_channels, 1, 1).expand(
            1, num_channels, patch, patch)
        return self.pack(x.contiguous()).reshape(-1).round().long()

    def install_taps(self, network: nn.Module) -> tuple[nn.ModuleDict, dict[str, OutputTap]]:
        """Remove `output_modules` from the network, replacing them by taps. Returns (removed, taps)."""
        removed, taps = nn.ModuleDict(), {}
        for i, name in enumerate(self.output_modules):
            module = _get_module(network, name)
            out_features = module.out_features if isinstance(module, nn.Linear) else None
            tap = OutputTap(out_features)
            _set_module(network, name, tap)
            removed[name.replace(".", "_")] = module
            taps[name] = tap
        return removed, taps

    def scaled_timestep(self, cfg: Config, sigma: torch.Tensor) -> torch.Tensor:
        """Network timestep = sigma * num_timesteps (PIFLOW.md §1.1)."""
        return sigma * cfg.model.num_timesteps


def weights_dtype(cfg: Config) -> torch.dtype:
    """The frozen networks' dtype: `model.dtype`, but bf16 in a `train.precision: bf16` run whatever model.dtype
    says (issue 23: a bf16 run multiplies in bf16 everywhere; ZeRO-3 makes the student's trunk bf16 anyway, and a
    separate teacher or an exported student's base must not fall back to float32)."""
    train = getattr(cfg, "train", None)
    if getattr(train, "precision", "fp32") == "bf16":
        return torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]


# ------------------------------------------------------------------------------- attention and compilation
def attention_backends() -> list[str]:
    """`model.attention_backend` choices: "auto" and the diffusers 0.42.1 attention dispatcher's backends."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return ["auto"] + sorted(b.value for b in AttentionBackendName)


def set_attention_backend(network: nn.Module, backend: str, training: bool = True) -> int:
    """Route the network's attention through `backend` (diffusers' dispatcher); returns how many attention
    modules took it.

    "auto" keeps diffusers' default (torch SDPA, which picks its own kernel per call) and, in a process that
    trains (`training`), keeps SDPA off the cuDNN kernel on CUDA: the one failure seen (torch 2.11, H200, cuDNN
    attention BACKWARD at FLUX width) is not yet re-measured on the pinned torch; `benchmarks/gpu_full_depth.py` measures every backend at FLUX
    shape, and a measured winner goes here as the CUDA default (docs/performance-gpu.md). Another name forces
    that backend (e.g. "_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3" when
    flash-attn 3 is installed); a backend whose package is missing is a one-line error naming the key."""
    if backend == "auto":
        if training:
            torch.backends.cuda.enable_cudnn_sdp(False)  # process-wide; no effect on CPU
        return 0
    if not hasattr(network, "set_attention_backend"):
        raise ValueError(f"model.attention_backend: {type(network).__name__} has no attention dispatcher; "
                         "use auto")
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    try:
        network.set_attention_backend(backend)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"model.attention_backend: {backend!r} cannot run here: {e}") from None
    finally:  # diffusers also makes it the process-wide default: other networks here keep theirs
        _AttentionBackendRegistry.set_active_backend(active)
    taken = sum(getattr(getattr(m, "processor", None), "_attention_backend", None) is not None
                for m in network.modules())
    if taken == 0:
        raise ValueError(f"model.attention_backend: {backend!r}, but {type(network).__name__}'s attention does not "
                         "go through diffusers' dispatcher (it calls torch SDPA itself): use auto")
    return taken


def compile_blocks(network: nn.Module, **compile_kwargs) -> int:
    """Regional compilation: `torch.compile` each repeated transformer block (diffusers' `_repeated_blocks`
    classes, or every block of the network's block lists when a class names none), not the whole network:
    one compiled graph per block kind, reused by every block of that kind (compile time of a few blocks, not
    of 57). Returns how many blocks were compiled."""
    names = set(getattr(network, "_repeated_blocks", None) or ())
    blocks = [m for m in network.modules() if type(m).__name__ in names]
    if not blocks:  # e.g. diffusers' DiT: the members of its block lists
        blocks = [b for name, m in network.named_children() if isinstance(m, nn.ModuleList) and "block" in name
                  for b in m]
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def prepare_network(network: nn.Module, cfg: Config, training: bool) -> None:
    """The run's attention backend (`model.attention_backend`) and regional compilation (`train.compile`) for
    a student trunk (`training`) or a frozen teacher."""
    set_attention_backend(network, getattr(cfg.model, "attention_backend", "auto"), training)
    backend = getattr(cfg.train, "compile", "none")
    if backend == "none":
        return
    # Under ZeRO-3 every submodule carries DeepSpeed's gather/release hooks: dynamo breaks the graph at each
    # (measured on CPU: same numbers, fragmented graphs). Elsewhere a block is one graph, and fullgraph makes
    # any break an error instead of a silent slowdown.
    fullgraph = not (training and getattr(cfg.train, "engine", "torch") == "deepspeed")
    if compile_blocks(network, backend=backend, fullgraph=fullgraph) == 0:
        raise ValueError(f"train.compile: {type(network).__name__} has no repeated blocks to compile")
