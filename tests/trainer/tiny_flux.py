"""A tiny FLUX transformer (diffusers `FluxTransformer2DModel`, STACK.md's config) wrapped to take
unpacked latents: the stand-in student/teacher of the engine tests (real class, tiny config, no download).

`TinyFlux()(x (B,C,H,W), sigma (B,), cond) -> u (B,C,H,W)`, cond = {"prompt_embeds" (B,T,32),
"pooled" (B,32)}; C = 4, H = W = 8 by default (16 packed tokens of 16 channels).
"""
from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

C, H, W, T, D = 4, 8, 8, 4, 32


def flux_config() -> dict:
    return dict(patch_size=1, in_channels=4 * C, num_layers=1, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=D, pooled_projection_dim=D, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6))


def _pack(x: torch.Tensor) -> torch.Tensor:  # (B,C,H,W) -> (B, H/2*W/2, 4C)
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:  # (B, H/2*W/2, 4C) -> (B,C,H,W)
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def _img_ids(h: int, w: int) -> torch.Tensor:  # (h/2*w/2, 3) as FluxPipeline._prepare_latent_image_ids
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


class TinyFlux(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = FluxTransformer2DModel(**flux_config())

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        b, c, h, w = x.shape
        dtype = self.transformer.x_embedder.weight.dtype
        out = self.transformer(
            hidden_states=_pack(x).to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled"].to(dtype),
            timestep=sigma.to(dtype),
            img_ids=_img_ids(h, w),
            txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3),
            guidance=torch.full((b,), 3.5, dtype=dtype),
            return_dict=False,
        )[0]
        return _unpack(out.float(), h, w)


def make_cond(batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(batch, T, D, generator=g), "pooled": torch.randn(batch, D, generator=g)}
