"""Qwen-Image (PIFLOW.md §1.1-§1.4, §3.7, §5).

- Latents: 16 channels at H/8 x W/8, packed in 2x2 patches exactly like FLUX (64 features per token); the
  transformer's rotary positions come from `img_shapes` = (1, H/2, W/2) per sample.
- Timestep: sigma in [0, 1] (the transformer scales by 1000 itself; num_timesteps = 1).
- Guidance: true CFG, scale 4.0 over the whole sigma range, against the empty-prompt embeddings (carried in
  `cond` as `negative_prompt_embeds` / `negative_prompt_embeds_mask`). Plain CFG as PIFLOW.md §1.3; note that
  diffusers' QwenImagePipeline additionally rescales the guided prediction to the conditional's per-token norm.
- Conditioning: Qwen2.5-VL last hidden states `prompt_embeds` (B, T, 3584) with `prompt_embeds_mask` (B, T).
  Cond and uncond sequences differ in length: `cat_cond` pads with masked zeros (masked keys change nothing).
- VAE: per-channel x = (z - latents_mean) / latents_std (a video VAE used on single frames).
- Student: keeps `norm_out`, replaces `proj_out`; the last block's `txt_mlp` gets no LoRA (its output is unused).
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from torch import nn
from torch.nn import functional as F

from models.families.base import TransformerFamily
from models.types import Cond, Config, network_device, network_dtype
from models.families.flux import pack_2x2, unpack_2x2


# The public Qwen-Image transformer config (Qwen/Qwen-Image, transformer/config.json).
QWEN_IMAGE_CONFIG = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)


def pad_sequence(embeds: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (B, T, D) embeddings and their (B, T) mask to `length` tokens with zeros / mask 0."""
    extra = length - embeds.shape[1]
    if extra <= 0:
        return embeds, mask
    return F.pad(embeds, (0, 0, 0, extra)), F.pad(mask, (0, extra))


class QwenImageFamily(TransformerFamily):
    name = "qwen_image"
    transformer_class = QwenImageTransformer2DModel
    public_config = QWEN_IMAGE_CONFIG
    vae_class = AutoencoderKLQwenImage

    def tiny_config(self, cfg: Config) -> dict:
        C = cfg.model.latent_channels
        return dict(patch_size=2, in_channels=4 * C, out_channels=C, num_layers=2, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6))

    def patch_size(self, network: nn.Module) -> int:
        return network.config.patch_size

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return pack_2x2(x)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return unpack_2x2(tokens, height, width)

    def network_inputs(self, cfg: Config, network: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor,
                       cond: Cond) -> dict:
        B, C, H, W = x_t.shape
        dtype, device = network_dtype(network), network_device(network)
        embeds = cond["prompt_embeds"]  # (B, T, joint_dim)
        mask = cond.get("prompt_embeds_mask")  # (B, T) or absent (= all valid); optional by the data contract
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
        return dict(
            hidden_states=self.pack(x_t).to(device, dtype),
            encoder_hidden_states=embeds.to(device, dtype),
            encoder_hidden_states_mask=mask.to(device),
            timestep=self.scaled_timestep(cfg, sigma).to(device, dtype),
            img_shapes=[[(1, H // 2, W // 2)]] * B,
        )

    def uncond(self, cfg: Config, cond: Cond) -> Cond | None:
        if "negative_prompt_embeds" not in cond:
            raise KeyError("Qwen-Image CFG needs cond['negative_prompt_embeds'] (the empty-prompt embeddings); "
                           "encode prompts with models.families.load_text_encoder")
        neg = cond["negative_prompt_embeds"]
        B = cond["prompt_embeds"].shape[0]
        if neg.shape[0] == 1 and B > 1:  # one shared empty-prompt embedding
            neg = neg.expand(B, -1, -1)
        mask = cond.get("negative_prompt_embeds_mask")
        if mask is None:
            mask = torch.ones(neg.shape[:2], dtype=torch.long, device=neg.device)
        return {"prompt_embeds": neg, "prompt_embeds_mask": mask.expand(B, -1)}

    def cat_cond(self, conds: list[Cond]) -> Cond:
        """Concatenate along the batch the sequences every dict carries (`prompt_embeds`, and
        `negative_prompt_embeds` when all have it), each right-padded with masked zeros to the longest."""
        out: Cond = {}
        for key in ("prompt_embeds", "negative_prompt_embeds"):
            if not all(key in c for c in conds):
                continue
            length = max(c[key].shape[1] for c in conds)
            embeds, masks = [], []
            for c in conds:
                mask = c.get(f"{key}_mask")
                if mask is None:
                    mask = torch.ones(c[key].shape[:2], dtype=torch.long, device=c[key].device)
                rows = c[key].shape[0]
                e, m = pad_sequence(c[key], mask.long().expand(rows, -1), length)
                embeds.append(e)
                masks.append(m)
            out[key], out[f"{key}_mask"] = torch.cat(embeds), torch.cat(masks)
        return out

    def lora_excluded_modules(self, network: nn.Module, targets: list[str]) -> list[str]:
        # The last block's text stream feeds nothing (only image tokens reach norm_out): no gradient, no LoRA.
        last = f"transformer_blocks.{len(network.transformer_blocks) - 1}"
        return [f"{last}.{t}" for t in targets if t.startswith("txt_mlp")]

    # ---- VAE normalisation (PIFLOW.md §1.4)
    def _stats(self, vae, like: torch.Tensor):
        mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        return mean, std

    def vae_to_latent(self, vae, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, H, W) or the VAE's single-frame (B, C, 1, H, W) -> policy latent (B, C, H, W)."""
        z = z[:, :, 0] if z.dim() == 5 else z
        mean, std = self._stats(vae, z)
        return (z - mean) / std

    def latent_to_vae(self, vae, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(vae, x)
        return (x * std + mean).unsqueeze(2)  # (B, C, 1, H, W)

    def decode(self, vae, x: torch.Tensor, cfg: Config = None) -> torch.Tensor:
        """(B, C, H, W) policy latents -> images (B, 3, 8H, 8W) in [-1, 1]."""
        z = self.latent_to_vae(vae, x).to(vae.device, vae.dtype)
        return vae.decode(z, return_dict=False)[0][:, :, 0].float()
