"""Class-conditional ImageNet DiT with a flow-matching objective (PIFLOW.md §1.1-§1.4, §3.7, §5).

- Latents: SD-VAE, 4 x 32 x 32 at 256^2, x = z * scaling_factor (0.18215). The network takes (B, C, H, W)
  images; its patchify is internal. `pack`/`unpack` are the layout of `proj_out_2`'s features per patch token:
  feature = (i*p + j) * C + c (the transformer's own un-patchify).
- Timestep: sigma * num_timesteps with num_timesteps = 1000 (the FM-DiT teacher); the output is the velocity
  u = eps - x0 (a learned-sigma model's extra channels are ignored).
- Guidance: true CFG (2.7 for the FM-DiT 1-NFE student) only for sigma inside the interval ([0, 0.6]); the
  negative condition is the null class id = num_embeds_ada_norm (1000 on ImageNet).
- Conditioning: `class_labels` (B,) int64; prompts are the class ids as text ("207").
- Student: full copy, keeps the adaLN `proj_out_1`, replaces `proj_out_2`; the logstd head reads the
  timestep + class embedding. Label dropout is switched off in the student.
"""
from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from models.families.base import Cond, Config, OutputTap, TransformerFamily, network_device, network_dtype


# DiT-XL/2 at 256^2 (the FM-DiT teacher's architecture: 28 layers, 16 heads x 72, patch 2, 4 latent channels).
DIT_XL2_CONFIG = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=4, num_layers=28, sample_size=32,
    patch_size=2, norm_num_groups=32, num_embeds_ada_norm=1000,
)


class DiTFamily(TransformerFamily):
    name = "dit"
    transformer_class = DiTTransformer2DModel
    output_modules = ("proj_out_2",)
    proj_module = "proj_out_2"

    def __init__(self):
        self._patch = 2  # pack/unpack need p: refreshed from every network this family prepares inputs for

    def tiny_config(self, cfg: Config) -> dict:
        C = cfg.model.latent_channels
        return dict(num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=C, num_layers=2,
                    sample_size=cfg.model.latent_size, patch_size=2, norm_num_groups=min(4, C),
                    num_embeds_ada_norm=1000)

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
        return out[:, : x_t.shape[1]].float()  # learned-sigma models: the first C channels are the prediction

    def tokens_to_velocity(self, tokens: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        return self.unpack(tokens, x_t.shape[-2], x_t.shape[-1])[:, : x_t.shape[1]].float()

    def uncond(self, cfg: Config, cond: Cond) -> Cond | None:
        # The null class is the extra embedding row after the real classes (id num_classes).
        return {"class_labels": torch.full_like(cond["class_labels"], cfg.model.num_classes)}

    def load_network(self, cfg: Config) -> nn.Module:
        network = super().load_network(cfg)
        if network.config.num_embeds_ada_norm != cfg.model.num_classes:
            raise ValueError(f"model.num_classes={cfg.model.num_classes} but the DiT has "
                             f"num_embeds_ada_norm={network.config.num_embeds_ada_norm}")
        self.patch_size(network)
        return network

    # ---- student split: proj_out_2 replaced; the conditioning embedding is caught by a hook
    def install_taps(self, network: nn.Module):
        removed, taps = super().install_taps(network)
        self.patch_size(network)
        cond_tap = OutputTap(None)
        taps["conditioning"] = cond_tap

        def _catch(module, args, output):
            cond_tap.captured = (output,)

        network.transformer_blocks[0].norm1.emb.register_forward_hook(_catch)
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

    def velocity_proj(self, proj: nn.Linear, num_channels: int) -> nn.Linear:
        """Learned-sigma DiTs predict 2C channels per pixel: keep the rows of the first C."""
        p2 = self._patch * self._patch
        C_out, C = proj.out_features // p2, num_channels
        if C_out == C:
            return proj
        keep = torch.arange(proj.out_features).view(p2, C_out)[:, :C].reshape(-1)
        sub = nn.Linear(proj.in_features, keep.numel(), bias=proj.bias is not None).to(proj.weight)
        with torch.no_grad():
            sub.weight.copy_(proj.weight[keep])
            if proj.bias is not None:
                sub.bias.copy_(proj.bias[keep])
        return sub

    def prepare_student_network(self, network: nn.Module) -> None:
        for m in network.modules():
            if isinstance(m, LabelEmbedding):
                m.dropout_prob = 0.0  # no CFG label dropout while distilling (the null row stays for the teacher)

    # ---- VAE normalisation (PIFLOW.md §1.4)
    def vae_to_latent(self, vae, z: torch.Tensor) -> torch.Tensor:
        return z * vae.config.scaling_factor

    def latent_to_vae(self, vae, x: torch.Tensor) -> torch.Tensor:
        return x / vae.config.scaling_factor

    def decode(self, vae, x: torch.Tensor) -> torch.Tensor:
        return vae.decode(self.latent_to_vae(vae, x).to(vae.device, vae.dtype), return_dict=False)[0].float()
