"""Policy heads that replace a network's final output projection (PIFLOW.md §2.1, §2.2, §2.7).

Heads work per token: the family adapter feeds the hidden states that went into the teacher's `proj_out`
(after `norm_out`) and un-patchifies the outputs into the policy's (B, K, C, H, W) layout. Each output
feature of the teacher's projection belongs to one latent channel; the family passes that mapping
(`channel_index`) so the symmetry-breaking bias noise is shared across the p^2 positions of a patch.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class GMHead(nn.Module):
    """hidden (B, T, D) + conditioning embedding (B, E) -> GM parameters per token.

    Returns
      means       (B, T, K, out_dim)        u-space component means, out_dim = p*p*C features per token
      logweights  (B, T, K, patch_pixels)   log-softmax over K, one per latent pixel in the patch
      logstd      (B,)                      one shared u-space log-std per sample
    """

    def __init__(
        self,
        hidden_dim: int,
        out_dim: int,
        num_components: int,
        patch_pixels: int,
        cond_dim: int,
        logstd_inner_dim: int = 1024,
        init_logstd: float = math.log(0.05),
    ):
        super().__init__()
        self.num_components = num_components
        self.out_dim = out_dim
        self.patch_pixels = patch_pixels
        self.proj_out_means = nn.Linear(hidden_dim, num_components * out_dim)
        self.proj_out_logweights = nn.Linear(hidden_dim, num_components * patch_pixels)
        # logstd reads the DETACHED conditioning embedding: no gradient from logstd into the trunk.
        self.proj_out_logstds = nn.Sequential(
            nn.SiLU(), nn.Linear(cond_dim, logstd_inner_dim), nn.SiLU(), nn.Linear(logstd_inner_dim, 1)
        )
        nn.init.zeros_(self.proj_out_logweights.weight)
        nn.init.zeros_(self.proj_out_logweights.bias)
        nn.init.xavier_uniform_(self.proj_out_logstds[1].weight)
        nn.init.zeros_(self.proj_out_logstds[1].bias)
        nn.init.zeros_(self.proj_out_logstds[3].weight)
        nn.init.constant_(self.proj_out_logstds[3].bias, init_logstd)
        # Fallback without a teacher projection (§2.2 item 5): zero weight, N(0, 0.1^2) bias.
        nn.init.zeros_(self.proj_out_means.weight)
        nn.init.normal_(self.proj_out_means.bias, std=0.1)

    @classmethod
    def from_teacher_proj(
        cls,
        proj: nn.Linear,
        num_components: int,
        patch_pixels: int,
        cond_dim: int,
        channel_index: torch.Tensor,
        bias_noise: float = 0.05,
        logstd_inner_dim: int = 1024,
        init_logstd: float = math.log(0.05),
        generator: torch.Generator | None = None,
    ) -> "GMHead":
        """Replicate the teacher's projection K times; bias noise N(0, bias_noise^2) per (component, channel)."""
        out_dim, hidden_dim = proj.weight.shape
        if channel_index.shape != (out_dim,):
            raise ValueError(f"channel_index must have shape ({out_dim},), got {tuple(channel_index.shape)}")
        head = cls(hidden_dim, out_dim, num_components, patch_pixels, cond_dim, logstd_inner_dim, init_logstd)
        head.to(device=proj.weight.device)
        num_channels = int(channel_index.max()) + 1
        with torch.no_grad():
            w = proj.weight.detach().float()  # (out_dim, D)
            b = proj.bias.detach().float() if proj.bias is not None else torch.zeros(out_dim, device=w.device)
            noise = torch.randn(num_components, num_channels, generator=generator) * bias_noise  # (K, C)
            noise = noise.to(w.device)[:, channel_index.to(w.device)]  # (K, out_dim), shared within a patch
            head.proj_out_means.weight.copy_(w.repeat(num_components, 1))
            head.proj_out_means.bias.copy_((b.unsqueeze(0) + noise).reshape(-1))
        return head

    def forward(self, hidden: torch.Tensor, temb: torch.Tensor):
        B, T, _ = hidden.shape
        K = self.num_components
        means = self.proj_out_means(hidden).reshape(B, T, K, self.out_dim)
        logweights = self.proj_out_logweights(hidden).reshape(B, T, K, self.patch_pixels)
        logweights = torch.log_softmax(logweights.float(), dim=2)
        logstd = self.proj_out_logstds(temb.detach()).reshape(B)
        return means, logweights, logstd


class DXHead(nn.Module):
    """hidden (B, T, D) -> N u-space outputs per token, (B, T, N, out_dim) (§2.7): grid values or polynomial
    coefficients (`models.policies.dx_x0_from_u` turns them into x0 space)."""

    def __init__(self, hidden_dim: int, out_dim: int, num_grid: int):
        super().__init__()
        self.num_grid = num_grid
        self.out_dim = out_dim
        self.proj_out = nn.Linear(hidden_dim, num_grid * out_dim)

    @classmethod
    def from_teacher_proj(cls, proj: nn.Linear, num_grid: int, mode: str = "grid") -> "DXHead":
        """Start from the teacher's x0 prediction held over the whole segment, no noise.

        grid: the teacher's projection replicated N times (every grid point is the teacher's x0);
        polynomial: the teacher's projection for the constant coefficient, zeros for the N - 1 others."""
        if mode not in ("grid", "polynomial"):
            raise ValueError(f"DXHead: mode must be 'grid' or 'polynomial', got {mode!r}")
        out_dim, hidden_dim = proj.weight.shape
        head = cls(hidden_dim, out_dim, num_grid).to(device=proj.weight.device)
        copies = num_grid if mode == "grid" else 1
        with torch.no_grad():
            w = proj.weight.detach().float()
            bias = proj.bias.detach().float() if proj.bias is not None else torch.zeros(out_dim, device=w.device)
            head.proj_out.weight.zero_()
            head.proj_out.bias.zero_()
            head.proj_out.weight[:copies * out_dim].copy_(w.repeat(copies, 1))
            head.proj_out.bias[:copies * out_dim].copy_(bias.repeat(copies))
        return head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        B, T, _ = hidden.shape
        return self.proj_out(hidden).reshape(B, T, self.num_grid, self.out_dim)
