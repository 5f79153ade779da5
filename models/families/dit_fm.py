"""The paper's ImageNet teacher network: a flow-matching DiT whose blocks share ONE time + class embedding.

The reference FM-DiT (pi-Flow's `flowdit_imagenet` teacher) differs from diffusers' `DiTTransformer2DModel` in
two ways that change every output: the conditioning embedding c = MLP(sinusoid(t)) + E[class] is computed once
and fed to every block's adaLN-Zero (diffusers gives each block its own copy), and the sinusoid uses
`downscale_freq_shift = 0` (frequencies exp(-ln(10000) k / 128), as the original DiT; diffusers' DiT uses 1).
The output is the flow velocity u = eps - x0 at t = sigma * 1000. The module names are the reference's, so its
state dict loads by name (`models/converters/dit_fm.py` checks and writes it in the diffusers format).

    x (B, C, H, W) -> patch embed + 2-D sincos positions -> N x [adaLN-Zero(c): attention, MLP]
      -> LayerNorm * (1 + scale(c)) + shift(c) -> proj_out_2 -> un-patchify (p, p, C) channel-last
"""
from __future__ import annotations

from typing import Optional

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.normalization import AdaLayerNormZero
from torch import nn
from torch.nn import functional as F


class ClassEmbedding(nn.Module):
    """E[class]: num_classes rows plus the null (CFG) row at index num_classes."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class SharedConditioning(nn.Module):
    """c = MLP(sinusoid_256(t)) + E[class], computed once per forward for all blocks."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=dim)
        self.class_embedder = ClassEmbedding(num_classes, dim)

    def forward(self, timestep: torch.Tensor, class_labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t_emb = self.timestep_embedder(self.time_proj(timestep).to(dtype))  # (B, D)
        return t_emb + self.class_embedder(class_labels).to(dtype)


class FlowDiTBlock(nn.Module):
    """adaLN-Zero block modulated by the shared embedding (it has no embedding of its own)."""

    def __init__(self, dim: int, heads: int, head_dim: int, norm_eps: float):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim, num_embeddings=None)  # c -> 6 modulations; LayerNorm eps 1e-6
        self.attn1 = Attention(query_dim=dim, heads=heads, dim_head=head_dim, bias=True, out_bias=True)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ff = FeedForward(dim, activation_fn="gelu-approximate")

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, emb=emb)
        x = x + gate_msa.unsqueeze(1) * self.attn1(h)
        h = self.norm3(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp.unsqueeze(1) * self.ff(h)


class FlowDiTTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """forward(hidden_states (B, C, H, W), timestep (B,) = sigma * 1000, class_labels (B,)) -> u (B, C_out, H, W)."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["FlowDiTBlock"]

    @register_to_config
    def __init__(self, num_attention_heads: int = 16, attention_head_dim: int = 72, in_channels: int = 4,
                 out_channels: Optional[int] = None, num_layers: int = 28, sample_size: int = 32, patch_size: int = 2,
                 num_embeds_ada_norm: int = 1000, norm_eps: float = 1e-5):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.out_channels = out_channels or in_channels
        self.gradient_checkpointing = False
        self.pos_embed = PatchEmbed(height=sample_size, width=sample_size, patch_size=patch_size,
                                    in_channels=in_channels, embed_dim=dim)
        self.emb = SharedConditioning(num_embeds_ada_norm, dim)
        self.transformer_blocks = nn.ModuleList(
            [FlowDiTBlock(dim, num_attention_heads, attention_head_dim, norm_eps) for _ in range(num_layers)])
        self.norm_out = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, patch_size * patch_size * self.out_channels)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                return_dict: bool = True):
        B, _, H, W = hidden_states.shape
        p = self.config.patch_size
        timestep = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(B)
        x = self.pos_embed(hidden_states)  # (B, T, D)
        emb = self.emb(timestep, class_labels, x.dtype)  # (B, D), one for every block
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, emb)
            else:
                x = block(x, emb)
        shift, scale = self.proj_out_1(F.silu(emb)).chunk(2, dim=1)
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        x = self.proj_out_2(x)  # (B, T, p*p*C)
        C = self.out_channels
        out = x.reshape(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
