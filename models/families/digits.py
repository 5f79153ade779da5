"""The embedded default's family: a tiny FLUX-architecture text-to-image model on 8x8 digits (DESIGN.md §9).

Everything is the FLUX family (packing, position ids, embedded guidance, CLIP + T5 conditioning), except
that the "latents" are the 1-channel 8x8 images themselves (no VAE at this size) and the tiny architecture is
the one the project trains its digits teacher with (`trainer/teachers/digits.py`).
"""
from __future__ import annotations

import torch

from models.families.flux import FluxFamily
from models.types import Config

# The digits teacher's transformer (in_channels = 4 x 1 channel, packed 2x2); text width 32 = tiny CLIP/T5.
DIGITS_ARCH = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                   axes_dims_rope=(4, 6, 6))


class DigitsFamily(FluxFamily):
    name = "digits"
    uses_vae = False
    public_config = DIGITS_ARCH  # the project's own teacher

    def tiny_config(self, cfg: Config) -> dict:
        return dict(DIGITS_ARCH)

    def latent_shape(self, cfg: Config) -> tuple[int, int, int]:
        return (1, 8, 8)

    def decode(self, vae, x: torch.Tensor, cfg: Config = None) -> torch.Tensor:
        """The latents are the images: (B, 1, 8, 8) in [-1, 1]."""
        return x.float().clamp(-1, 1)
