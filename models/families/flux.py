"""FLUX.1-dev (PIFLOW.md §1.1-§1.4, §3.7, §5).

- Latents: 16 channels at H/8 x W/8; the network sees 2x2 patches packed into tokens of 64 features
  (feature = c*4 + i*2 + j, tokens in raster order), with image position ids (0, row, col) and text ids 0.
- Timestep: the transformer receives sigma in [0, 1] and multiplies by 1000 itself (num_timesteps = 1).
- Guidance: no CFG; the guidance-distilled embedding (3.5) goes to teacher AND student.
- Conditioning: T5 sequence `prompt_embeds` (B, 512, 4096), CLIP-L pooled `pooled_prompt_embeds` (B, 768).
- VAE: x = (z - shift_factor) * scaling_factor.
- Student: keeps `norm_out` (AdaLayerNormContinuous, trainable copy), replaces the root `proj_out`.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch import nn

from models.families.base import TransformerFamily
from models.types import Cond, Config, network_device, network_dtype


# The public FLUX.1-dev transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json).
FLUX_DEV_CONFIG = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# FLUX.1 VAE normalisation (vae/config.json of FLUX.1-dev).
FLUX_VAE_SHIFT = 0.1159
FLUX_VAE_SCALE = 0.3611


def pack_2x2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C) with feature c*4 + i*2 + j (the FLUX/Qwen-Image token layout)."""
    B, C, H, W = x.shape
    if H % 2 or W % 2:
        raise ValueError(f"latent height and width must be even for 2x2 packing, got {H}x{W}")
    x = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_2x2(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_2x2`: (B, H/2 * W/2, 4C) -> (B, C, H, W)."""
    B, T, F = tokens.shape
    if T != (height // 2) * (width // 2) or F % 4:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not pack a {height}x{width} latent in 2x2 patches")
    x = tokens.reshape(B, height // 2, width // 2, F // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, F // 4, height, width)


def latent_image_ids(h_tokens: int, w_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h*w, 3) position ids of the packed image tokens: (0, row, col)."""
    rows = torch.arange(h_tokens, device=device, dtype=dtype).view(-1, 1).expand(h_tokens, w_tokens)
    cols = torch.arange(w_tokens, device=device, dtype=dtype).view(1, -1).expand(h_tokens, w_tokens)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


class FluxFamily(TransformerFamily):
    name = "flux"
    transformer_class = FluxTransformer2DModel
    public_config = FLUX_DEV_CONFIG
    vae_class = AutoencoderKL

    def tiny_config(self, cfg: Config) -> dict:
        # STACK.md's tiny FLUX; text dims match models/text_encoders.py's tiny CLIP/T5 (32).
        return dict(patch_size=1, in_channels=4 * cfg.model.latent_channels, num_layers=1, num_single_layers=1,
                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                    guidance_embeds=True, axes_dims_rope=(4, 6, 6))

    def patch_size(self, network: nn.Module) -> int:
        return 2 * network.config.patch_size

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return pack_2x2(x)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return unpack_2x2(tokens, height, width)

    def embedded_guidance(self, cfg: Config, network: nn.Module) -> float | None:
        if not network.config.guidance_embeds:
            return None
        g = cfg.teacher.guidance
        if g.mode != "embedded":
            raise ValueError(f"this FLUX transformer takes an embedded guidance value: set teacher.guidance.mode: "
                             f"embedded (and scale: 3.5 for FLUX.1-dev), got mode {g.mode!r}")
        return g.scale

    def network_inputs(self, cfg: Config, network: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor,
                       cond: Cond) -> dict:
        B, C, H, W = x_t.shape
        dtype, device = network_dtype(network), network_device(network)
        prompt = cond["prompt_embeds"]  # (B, T, joint_dim)
        inputs = dict(
            hidden_states=self.pack(x_t).to(device, dtype),
            encoder_hidden_states=prompt.to(device, dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(device, dtype),
            timestep=self.scaled_timestep(cfg, sigma).to(device, dtype),
            img_ids=latent_image_ids(H // 2, W // 2, device, dtype),
            txt_ids=torch.zeros(prompt.shape[1], 3, device=device, dtype=dtype),
        )
        g = self.embedded_guidance(cfg, network)
        if g is not None:
            inputs["guidance"] = torch.full((B,), g, device=device, dtype=torch.float32)
        return inputs

    # ---- VAE normalisation (PIFLOW.md §1.4)
    def vae_to_latent(self, vae, z: torch.Tensor) -> torch.Tensor:
        return (z - vae.config.shift_factor) * vae.config.scaling_factor

    def latent_to_vae(self, vae, x: torch.Tensor) -> torch.Tensor:
        return x / vae.config.scaling_factor + vae.config.shift_factor

    def decode(self, vae, x: torch.Tensor, cfg: Config = None) -> torch.Tensor:
        """(B, C, H, W) policy latents -> images in [-1, 1]."""
        z = self.latent_to_vae(vae, x).to(vae.device, vae.dtype)
        return vae.decode(z, return_dict=False)[0].float()
