"""Class-conditional ImageNet DiT with a flow-matching objective (PIFLOW.md §1.1-§1.4, §3.7, §5).

- Network: the paper's FM-DiT (`models/families/dit_fm.py`: one shared time + class embedding, sinusoid with
  downscale_freq_shift 0), converted from the reference checkpoint by `piflow convert dit-fm`. A diffusers-format
  dir holding diffusers' own `DiTTransformer2DModel` loads with that class; a DDPM epsilon-prediction DiT
  (learned sigma, e.g. facebook/DiT-XL-2-256, or a scheduler that predicts epsilon) is refused.

- Latents: SD-VAE, 4 x 32 x 32 at 256^2, x = z * scaling_factor (0.18215). The network takes (B, C, H, W)
  images; its patchify is internal. `pack`/`unpack` are the layout of `proj_out_2`'s features per patch token:
  feature = (i*p + j) * C + c (the transformer's own un-patchify).
- Timestep: sigma * num_timesteps with num_timesteps = 1000 (the FM-DiT teacher); the output is the velocity
  u = eps - x0.
- Guidance: true CFG (2.7 for the FM-DiT 1-NFE student) only for sigma inside the interval ([0, 0.6]); the
  negative condition is the null class id = num_embeds_ada_norm (1000 on ImageNet).
- Conditioning: `class_labels` (B,) int64; prompts are the class ids as text ("207").
- Student: full copy, keeps the adaLN `proj_out_1`, replaces `proj_out_2`; the logstd head reads the
  timestep + class embedding (the shared `emb`; diffusers' DiT: block 0's). Label dropout is off in the student.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from models.families.base import TransformerFamily, weights_dtype
from models.types import Cond, Config, OutputTap, network_device, network_dtype
from models.families.dit_fm import FlowDiTTransformer2DModel


# DiT-XL/2 at 256^2 (the FM-DiT teacher's architecture: 28 layers, 16 heads x 72, patch 2, 4 latent channels).
DIT_XL2_CONFIG = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=4, num_layers=28, sample_size=32,
    patch_size=2, num_embeds_ada_norm=1000,
)
# Transformer classes a diffusers-format DiT dir may name in its config.json `_class_name`.
DIT_CLASSES = {cls.__name__: cls for cls in (FlowDiTTransformer2DModel, DiTTransformer2DModel)}
CONVERT_HINT = "convert the reference flow-matching DiT with `piflow convert dit-fm CHECKPOINT.pth --out DIR`"


def refuse_non_flow_teacher(source: str, transformer: dict, scheduler: dict | None) -> None:
    """A DDPM DiT predicts epsilon (and, with learned sigma, a variance): using its output as the velocity
    u = eps - x0 would silently distil the wrong field. Refuse it with the reason."""
    c_in, c_out = transformer.get("in_channels"), transformer.get("out_channels") or transformer.get("in_channels")
    if c_out == 2 * c_in:
        raise ValueError(f"{source}: out_channels = 2 x in_channels ({c_out} = 2 x {c_in}) is a learned-sigma DDPM "
                         f"DiT (epsilon + variance, e.g. facebook/DiT-XL-2-256), not a flow-matching teacher; "
                         f"{CONVERT_HINT}")
    if scheduler is None:
        return
    name = scheduler.get("_class_name", "")
    prediction = scheduler.get("prediction_type")
    flow = name.startswith("FlowMatch") or prediction == "flow_prediction" or scheduler.get("use_flow_sigmas")
    if prediction in ("epsilon", "v_prediction", "sample") or not flow:
        raise ValueError(f"{source}: scheduler {name or '?'} predicts {prediction or 'epsilon (its default)'}, not a "
                         f"flow-matching velocity; pi-Flow needs a flow-matching teacher; {CONVERT_HINT}")


class DiTFamily(TransformerFamily):
    name = "dit"
    transformer_class = FlowDiTTransformer2DModel
    output_modules = ("proj_out_2",)
    proj_module = "proj_out_2"

    public_config = DIT_XL2_CONFIG
    vae_class = AutoencoderKL

    def __init__(self):
        self._patch = 2  # pack/unpack need p: refreshed from every network this family prepares inputs for

    def tiny_config(self, cfg: Config) -> dict:
        C = cfg.model.latent_channels
        return dict(num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=C, num_layers=2,
                    sample_size=cfg.model.latent_size, patch_size=2, num_embeds_ada_norm=1000)

    def patch_size(self, network: nn.Module) -> int:
        self._patch = network.config.patch_size
        return self._patch

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self._patch
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
        return x.reshape(B, (H // p) * (W // p), p * p * C)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        B, T, F = tokens.shape
        p = self._patch
        C = F // (p * p)
        x = tokens.reshape(B, height // p, width // p, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, height, width)

    def network_inputs(self, cfg: Config, network: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor,
                       cond: Cond) -> dict:
        self.patch_size(network)
        dtype, device = network_dtype(network), network_device(network)
        return dict(hidden_states=x_t.to(device, dtype), timestep=self.scaled_timestep(cfg, sigma).to(device),
                    class_labels=cond["class_labels"].to(device, torch.long))

    def output_to_velocity(self, out: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        return out.float()  # image-shaped already (the network un-patchifies itself)

    def sequence_tokens(self, cfg: Config) -> int:
        _, H, W = self.latent_shape(cfg)
        return (H // 2) * (W // 2) + 1  # class conditioning enters through adaLN, not as tokens

    def uncond(self, cfg: Config, cond: Cond) -> Cond | None:
        # The null class is the extra embedding row after the real classes (id num_classes).
        return {"class_labels": torch.full_like(cond["class_labels"], cfg.model.num_classes)}

    def load_network(self, cfg: Config) -> nn.Module:
        if cfg.model.tiny:
            network = super().load_network(cfg)
        else:
            network = self._load_pretrained(cfg)
        if network.config.num_embeds_ada_norm != cfg.model.num_classes:
            raise ValueError(f"model.num_classes={cfg.model.num_classes} but the DiT has "
                             f"num_embeds_ada_norm={network.config.num_embeds_ada_norm}")
        self.patch_size(network)
        return network

    def network_class(self, config: dict) -> type:
        name = config.get("_class_name", FlowDiTTransformer2DModel.__name__)
        if name not in DIT_CLASSES:
            raise ValueError(f"family dit: transformer class {name!r} is not a DiT ({', '.join(DIT_CLASSES)})")
        return DIT_CLASSES[name]

    def pretrained_class(self, cfg: Config) -> type:
        """The class named by `model.pretrained`'s config.json, after refusing epsilon-prediction DiTs."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        root, sub = cfg.model.pretrained, cfg.model.subfolder or None
        if not root:
            raise ValueError("model.family=dit: set model.pretrained (a diffusers-format dir, e.g. written by "
                             "`piflow convert dit-fm`) or model.tiny: true")
        config = FlowDiTTransformer2DModel.load_config(root, subfolder=sub)  # reads config.json, any class
        try:  # scheduler_config.json of whatever scheduler the dir ships
            scheduler = FlowMatchEulerDiscreteScheduler.load_config(root, subfolder="scheduler")
        except EnvironmentError:
            scheduler = None  # a bare transformer dir: the transformer config alone decides
        refuse_non_flow_teacher(f"model.pretrained={root}", config, scheduler)
        return self.network_class(config)

    def _load_pretrained(self, cfg: Config) -> nn.Module:
        dtype = weights_dtype(cfg)
        return self.pretrained_class(cfg).from_pretrained(cfg.model.pretrained, subfolder=cfg.model.subfolder or None,
                                                          torch_dtype=dtype)

    # ---- student split: proj_out_2 replaced; the conditioning embedding is caught by a hook
    def install_taps(self, network: nn.Module):
        removed, taps = super().install_taps(network)
        self.patch_size(network)
        cond_tap = OutputTap(None)
        taps["conditioning"] = cond_tap

        def _catch(module, args, output):
            cond_tap.captured = (output,)

        shared = getattr(network, "emb", None)  # FM-DiT: one embedding; diffusers' DiT: block 0's copy
        (shared if shared is not None else network.transformer_blocks[0].norm1.emb).register_forward_hook(_catch)
        return removed, taps

    def student_tail_modules(self) -> tuple[str, ...]:
        return ()

    def head_inputs(self, tail: nn.ModuleDict, taps: dict[str, OutputTap], network: nn.Module):
        (hidden,) = taps["proj_out_2"].pop()[:1]
        (temb,) = taps["conditioning"].pop()
        return hidden, temb

    def teacher_tokens(self, tail: nn.ModuleDict, taps: dict[str, OutputTap], network: nn.Module) -> torch.Tensor:
        (hidden,) = taps["proj_out_2"].pop()[:1]
        taps["conditioning"].pop()
        return tail["proj_out_2"](hidden)

    def prepare_student_network(self, network: nn.Module) -> None:
        for m in network.modules():
            if isinstance(m, LabelEmbedding):
                m.dropout_prob = 0.0  # no CFG label dropout while distilling (the null row stays for the teacher)

    # ---- VAE normalisation (PIFLOW.md §1.4)
    def vae_to_latent(self, vae, z: torch.Tensor) -> torch.Tensor:
        return z * vae.config.scaling_factor

    def latent_to_vae(self, vae, x: torch.Tensor) -> torch.Tensor:
        return x / vae.config.scaling_factor

    def decode(self, vae, x: torch.Tensor, cfg: Config = None) -> torch.Tensor:
        return vae.decode(self.latent_to_vae(vae, x).to(vae.device, vae.dtype), return_dict=False)[0].float()
