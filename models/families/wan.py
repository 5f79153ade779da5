"""Wan 2.1 text-to-video (Wan-AI/Wan2.1-T2V-14B-Diffusers), a video teacher added by the one-file recipe.

- Latents: the Wan VAE's 16 channels at (frames - 1)/4 + 1 x H/8 x W/8, i.e. (B, C, T, H, W). The policy works on
  (B, C, T*H, W): frame t is rows [t*H, (t+1)*H) (the frames folded into the height axis; pi-Flow's policy math
  is per element, so nothing outside this file sees time). The network gets the clip back as (B, C, T, H, W).
- Tokens: patches (1, 2, 2), tokens in (t, h, w) raster order = raster order of the folded image's 2x2 patches;
  features of `proj_out` are channel-last, feature = (i*2 + j) * C + c (the transformer's own un-patchify).
- Timestep: sigma * 1000 (`num_timesteps: 1000`; the pipeline passes the scheduler's timesteps = sigmas * 1000);
  the output is the velocity u = eps - x0 (flow_prediction).
- Guidance: true CFG as WanPipeline: u = u_neg + g (u_pos - u_neg), g = 5.0 at every step, against the negative
  prompt's embeddings (the pipeline's default negative prompt is "", carried in `cond` as
  `negative_prompt_embeds`).
- Conditioning: UMT5-XXL last hidden states `prompt_embeds` (B, 512, 4096), zeroed past each prompt's tokens
  (as the pipeline pads); no mask goes to the transformer.
- VAE: per-channel x = (z - latents_mean) / latents_std.
- Student: replaces the root `proj_out` (its input is the already modulated `norm_out` output: Wan's final
  adaLN is inline, `scale_shift_table + temb`, so nothing is kept in front of the head); the logstd head reads
  `temb`, the time embedder's output, caught by a hook.
"""
from __future__ import annotations

import html
import re

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from torch import nn
from torch.nn import functional as F

from models.families.base import TransformerFamily
from models.types import Cond, Config, OutputTap

# The released transformer (Wan-AI/Wan2.1-T2V-14B-Diffusers, transformer/config.json): 40 blocks, 40 heads x 128.
WAN_T2V_14B_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)


def clean_prompt(text: str) -> str:
    """WanPipeline's prompt cleaning without ftfy: HTML entities unescaped twice, whitespace runs collapsed."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


class WanTextEncoder:
    """prompts -> {prompt_embeds (B, L, D), negative_prompt_embeds (B, L, D)} float32, L = max_sequence_length."""

    def __init__(self, text_encoder, tokenizer, max_sequence_length: int, negative_prompt: str = ""):
        self.model, self.tok, self.length = text_encoder, tokenizer, max_sequence_length
        self.negative_prompt = negative_prompt
        self._negative: torch.Tensor | None = None

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        batch = self.tok([clean_prompt(p) for p in prompts], padding="max_length", max_length=self.length,
                         truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        hidden = self.model(batch.input_ids.to(device), batch.attention_mask.to(device)).last_hidden_state
        keep = batch.attention_mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)  # zero past the tokens
        return (hidden * keep).float().cpu()

    def __call__(self, prompts: list[str]) -> Cond:
        if self._negative is None:
            self._negative = self.embed([self.negative_prompt])
        return {"prompt_embeds": self.embed(prompts),
                "negative_prompt_embeds": self._negative.expand(len(prompts), -1, -1).clone()}


def tiny_wan_text_encoder(seed: int):
    """A tiny UMT5 encoder (width 32 = the tiny transformer's text_dim) and a word-level tokenizer, no files."""
    from transformers import UMT5Config, UMT5EncoderModel

    from models.text_encoders import tiny_tokenizer

    tok = tiny_tokenizer(512, add_eos=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                            num_heads=4, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0))
    return model.eval(), tok


def tiny_wan_vae(cfg: Config) -> AutoencoderKLWan:
    """A seeded tiny Wan VAE (2x spatial, 2x temporal) with non-trivial latent statistics."""
    C = cfg.model.latent_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed + 2)
        g = torch.Generator().manual_seed(cfg.run.seed + 2)
        return AutoencoderKLWan(base_dim=8, z_dim=C, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                                latents_mean=(torch.randn(C, generator=g) * 0.3).tolist(),
                                latents_std=(1 + torch.rand(C, generator=g)).tolist()).eval()


class WanFamily(TransformerFamily):
    name = "wan"
    transformer_class = WanTransformer3DModel
    public_config = WAN_T2V_14B_CONFIG
    vae_class = AutoencoderKLWan
    output_modules = ("proj_out",)
    proj_module = "proj_out"

    def tiny_config(self, cfg: Config) -> dict:
        C = cfg.model.latent_channels
        # head dim 12: rotary split t/h/w = 4/4/4; text width 32 = the tiny UMT5
        return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=C,
                    out_channels=C, text_dim=32, freq_dim=16, ffn_dim=48, num_layers=2, rope_max_seq_len=64)

    def patch_size(self, network: nn.Module) -> int:
        p_t, p_h, p_w = network.config.patch_size
        if p_t != 1 or p_h != 2 or p_w != 2:
            raise ValueError(f"family wan: patch_size {tuple(network.config.patch_size)} is not (1, 2, 2)")
        return 2

    # ---- the folded layout: (B, C, T*H, W) <-> the clip (B, C, T, H, W)
    def to_video(self, cfg: Config, x: torch.Tensor) -> torch.Tensor:
        B, C, TH, W = x.shape
        T = cfg.model.latent_frames
        if TH % T:
            raise ValueError(f"family wan: latent height {TH} is not model.latent_frames={T} frames")
        return x.reshape(B, C, T, TH // T, W)

    @staticmethod
    def from_video(v: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = v.shape
        return v.reshape(B, C, T * H, W)

    def sequence_tokens(self, cfg: Config) -> int:
        _, TH, W = self.latent_shape(cfg)
        return (TH // 2) * (W // 2)  # the text enters through cross-attention, not the self-attention sequence

    # ---- tokens: 2x2 patches of the folded image, channel-last features
    def pack(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"family wan: latent frame height and width must be even, got {H}x{W}")
        x = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, i, j, C)
        return x.reshape(B, (H // 2) * (W // 2), 4 * C)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        B, T, Fe = tokens.shape
        if T != (height // 2) * (width // 2) or Fe % 4:
            raise ValueError(f"tokens {tuple(tokens.shape)} do not pack a {height}x{width} latent in 2x2 patches")
        x = tokens.reshape(B, height // 2, width // 2, 2, 2, Fe // 4).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, Fe // 4, height, width)

    def network_inputs(self, cfg: Config, network: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor,
                       cond: Cond) -> dict:
        # the input layer's dtype: a bf16 Wan keeps rope, time embedder and norms in fp32 (`_keep_in_fp32_modules`),
        # so the first parameter's dtype can be fp32 while the patch embedding is bf16 (found by the bf16 recipe)
        dtype = network.patch_embedding.weight.dtype
        return dict(hidden_states=self.to_video(cfg, x_t).to(dtype), timestep=self.scaled_timestep(cfg, sigma),
                    encoder_hidden_states=cond["prompt_embeds"].to(dtype))

    def output_to_velocity(self, out: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        return self.from_video(out).float()  # (B, C, T, H, W) -> folded

    # ---- CFG against the negative prompt
    def uncond(self, cfg: Config, cond: Cond) -> Cond | None:
        if "negative_prompt_embeds" not in cond:
            raise KeyError("Wan CFG needs cond['negative_prompt_embeds'] (the negative prompt's UMT5 embeddings); "
                           "encode prompts with the wan family's prompt encoder")
        neg = cond["negative_prompt_embeds"]
        return {"prompt_embeds": neg.expand(cond["prompt_embeds"].shape[0], -1, -1)}

    def cat_cond(self, conds: list[Cond]) -> Cond:
        # zero rows are what the pipeline pads with: sequences of different lengths pad to the longest
        length = max(c["prompt_embeds"].shape[1] for c in conds)
        return {"prompt_embeds": torch.cat([F.pad(c["prompt_embeds"], (0, 0, 0, length - c["prompt_embeds"].shape[1]))
                                            for c in conds])}

    # ---- student split: proj_out replaced; temb caught from the time embedder
    def install_taps(self, network: nn.Module):
        removed, taps = super().install_taps(network)
        cond_tap = OutputTap(None)
        taps["conditioning"] = cond_tap

        def _catch(module, args, output):
            cond_tap.captured = (output,)

        network.condition_embedder.time_embedder.register_forward_hook(_catch)
        return removed, taps

    def student_tail_modules(self) -> tuple[str, ...]:
        return ()

    def head_inputs(self, tail: nn.ModuleDict, taps: dict[str, OutputTap], network: nn.Module):
        (hidden,) = taps["proj_out"].pop()[:1]  # (B, T, D): norm_out(h) * (1 + scale) + shift
        (temb,) = taps["conditioning"].pop()  # (B, D)
        return hidden, temb

    def teacher_tokens(self, tail: nn.ModuleDict, taps: dict[str, OutputTap], network: nn.Module) -> torch.Tensor:
        (hidden,) = taps["proj_out"].pop()[:1]
        taps["conditioning"].pop()
        return tail["proj_out"](hidden)

    # ---- prompts and VAE
    def load_text_encoder(self, cfg: Config):
        if cfg.model.tiny:
            model, tok = tiny_wan_text_encoder(cfg.run.seed)
            return WanTextEncoder(model, tok, cfg.model.max_sequence_length)
        from transformers import UMT5EncoderModel

        from models.text_encoders import _load_components

        c = _load_components(cfg, {"text_encoder": UMT5EncoderModel, "tokenizer": None})
        return WanTextEncoder(c["text_encoder"], c["tokenizer"], cfg.model.max_sequence_length)

    def load_vae(self, cfg: Config):
        return tiny_wan_vae(cfg) if cfg.model.tiny else super().load_vae(cfg)

    def _stats(self, vae, like: torch.Tensor):
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def vae_to_latent(self, vae, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, T, H, W) from the VAE's encoder -> the folded policy latent (B, C, T*H, W)."""
        mean, std = self._stats(vae, z)
        return self.from_video((z - mean) / std)

    def latent_to_vae(self, vae, x: torch.Tensor, cfg: Config) -> torch.Tensor:
        v = self.to_video(cfg, x)
        mean, std = self._stats(vae, v)
        return v * std + mean

    def decode(self, vae, x: torch.Tensor, cfg: Config = None) -> torch.Tensor:
        """Folded policy latents (B, C, T*H, W) -> clips (B, 3, F, H', W') in [-1, 1]."""
        if cfg is None:
            raise ValueError("family wan: decode needs the run config (model.latent_frames)")
        z = self.latent_to_vae(vae, x, cfg).to(vae.dtype)
        return vae.decode(z, return_dict=False)[0].float()
