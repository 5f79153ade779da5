"""Images -> data latents with a family's VAE: `load_image_encoder(cfg)(images, seeds) -> latents`.

The latent is a posterior sample z = mean + std * eps (eps from a generator seeded per image, so any worker and
any batch give the same latent), normalised as the family's sampler expects (`family.vae_to_latent`: SD-VAE
x 0.18215 for DiT, FLUX's shift/scale, Qwen-Image's per-channel mean/std). Families whose latents are the
images themselves (digits) encode as the identity. The VAE comes from `model.pretrained`/vae (a local dir or a
hub id); with `model.tiny: true` a tiny seeded AutoencoderKL of the config's latent channels (8x downsampling)
is built in memory. It runs on the GPU when there is one.
"""
from __future__ import annotations

from typing import Optional

import torch

from models.types import Config


def tiny_vae(family: str, latent_channels: int, seed: int = 0):
    """A tiny AutoencoderKL (3 downsamplings = 8x, like the real ones), seeded: the same weights everywhere;
    the normalisation constants of the family's real VAE (SD-VAE for dit, FLUX.1's for flux)."""
    from diffusers import AutoencoderKL

    norm = {"dit": dict(scaling_factor=0.18215), "flux": dict(scaling_factor=0.3611, shift_factor=0.1159)}[family]
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=64, **norm).eval()


class ImageEncoder:
    """images (B, C, H, W) in [-1, 1] and one integer seed per image -> latents (B, c, h, w) float32 (CPU)."""

    def __init__(self, family, vae: Optional[torch.nn.Module]):
        self.family, self.vae = family, vae
        self.video = vae is not None and type(vae).__name__ == "AutoencoderKLQwenImage"  # 5-D (B, C, 1, H, W)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        if len(seeds) != images.shape[0]:
            raise ValueError(f"got {len(seeds)} seeds for {images.shape[0]} images")
        if self.vae is None:  # the latents are the images
            return images.float()
        p = next(self.vae.parameters())
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        x = images.to(device=p.device, dtype=p.dtype)
        dist = self.vae.encode(x[:, :, None] if self.video else x).latent_dist
        mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
        if self.video:
            mean, std = mean[:, :, 0], std[:, :, 0]
        eps = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
        return self.family.vae_to_latent(self.vae, mean + std * eps).float()


def load_image_encoder(cfg: Config) -> ImageEncoder:
    from models.families import get_family

    family = get_family(cfg.model.family)
    if not getattr(family, "uses_vae", True):
        return ImageEncoder(family, None)
    if cfg.model.pretrained:
        vae = family.vae_class.from_pretrained(cfg.model.pretrained, subfolder="vae").eval()
    elif cfg.model.tiny and cfg.model.family in ("dit", "flux"):
        vae = tiny_vae(cfg.model.family, cfg.model.latent_channels)
    else:
        raise ValueError(f"model.pretrained: the {cfg.model.family} family needs a VAE (model.pretrained with a "
                         "vae/ subfolder, or model.tiny: true for dit/flux)")
    if torch.cuda.is_available():
        vae = vae.cuda()
    return ImageEncoder(family, vae)
