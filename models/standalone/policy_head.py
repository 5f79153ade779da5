# The pi-Flow GM policy head, shipped inside `piflow export` directories (policy_head/policy_head.py) so that
# `diffusers.DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)` loads it with diffusers alone.
# Only torch and diffusers are imported here: this file must run without the piflow project installed.
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class PiFlowGMHead(ModelMixin, ConfigMixin):
    """hidden (B, T, D) + conditioning embedding (B, E) -> GM parameters per token (pi-Flow, arXiv 2510.14974):
    means (B, T, K, out_dim) u-space, logweights (B, T, K, patch_pixels) log-softmaxed over K, logstd (B,)."""

    @register_to_config
    def __init__(self, hidden_dim: int, out_dim: int, num_components: int, patch_pixels: int, cond_dim: int,
                 logstd_inner_dim: int = 1024):
        super().__init__()
        self.proj_out_means = nn.Linear(hidden_dim, num_components * out_dim)
        self.proj_out_logweights = nn.Linear(hidden_dim, num_components * patch_pixels)
        self.proj_out_logstds = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, logstd_inner_dim), nn.SiLU(),
                                              nn.Linear(logstd_inner_dim, 1))

    def forward(self, hidden: torch.Tensor, temb: torch.Tensor):
        B, T, _ = hidden.shape
        K = self.config.num_components
        means = self.proj_out_means(hidden).reshape(B, T, K, self.config.out_dim)
        logweights = self.proj_out_logweights(hidden).reshape(B, T, K, self.config.patch_pixels)
        logweights = torch.log_softmax(logweights.float(), dim=2)
        logstd = self.proj_out_logstds(temb).reshape(B)
        return means, logweights, logstd
