"""A pi-Flow student built from a teacher transformer (PIFLOW.md §2.1, §2.2, §2.7, §3.7).

The student is the teacher's trunk with its final output layers replaced: FLUX/Qwen-Image keep a trainable
copy of `norm_out` and replace `proj_out` by a GM head (K components) or a DX head (N grid points); DiT keeps
its adaLN `proj_out_1` and replaces `proj_out_2`. Heads start from the teacher's projection replicated K (or N)
times, so at initialisation the student's mixture-mean velocity is the teacher's velocity plus the bias noise.

Training is full fine-tuning (DiT) or LoRA through peft (FLUX, Qwen-Image): then only the adapters, the heads
and `norm_out` train, and in `shared` placement the teacher is this same trunk with the adapters disabled.
"""
from __future__ import annotations

import contextlib
import copy
import re
import torch
from torch import nn

from models.types import Cond, Config, OutputTap, network_dtype
from models.heads import DXHead, GMHead



def lora_target_regex(targets: list[str], excluded: list[str]) -> str:
    """A full-match regex over module names for peft: names ending in `.<target>`, minus `excluded` full names.

    Requiring a leading dot keeps root modules out (the root `proj_out` is the head's place, not a LoRA target,
    while FLUX's single blocks also have `proj_out`s that are)."""
    if not targets:
        raise ValueError("lora.target_modules is empty: name the module suffixes to adapt (PIFLOW.md §5)")
    alts = "|".join(re.escape(t) for t in targets)
    pattern = rf".*\.(?:{alts})"
    if excluded:
        pattern = rf"(?!(?:{'|'.join(re.escape(e) for e in excluded)})$)" + pattern
    return pattern


class TransformerStudent(nn.Module):
    """forward(x_src (B,C,H,W), sigma_src (B,), cond) -> policy parameters as tensors:
      GM: (means (B,K,C,H,W) u-space, logweights (B,K,1,H,W) log-softmaxed, logstd (B,))
      DX: (u_grid (B,N,C,H,W),)  u-space, converted to x0 by `policy_from_outputs`
    `make_policy` = forward + policy construction (float32). `family` is the `TransformerFamily` that builds it
    (models/families/base.py; not imported here: the families import this module, not the other way)."""

    def __init__(self, family, cfg: Config, transformer: nn.Module,
                 taps: dict[str, OutputTap], head: nn.Module, tail: nn.ModuleDict, teacher_tail: nn.ModuleDict):
        super().__init__()
        self.family = family
        self.cfg = cfg
        self.transformer = transformer
        self.head = head
        self.tail = tail  # trainable copies of kept output layers (FLUX/Qwen: norm_out)
        # Frozen original output layers: the teacher's path through this trunk (shared placement). Kept out of
        # the module tree's trainable set; small (norm_out + proj_out).
        self.teacher_tail = teacher_tail.requires_grad_(False)
        self._taps = taps  # live inside `transformer`; a plain dict so they are not registered twice

    # ------------------------------------------------------------------------------------- forward
    def _trunk(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> None:
        inputs = self.family.network_inputs(self.cfg, self.transformer, x_t, sigma, cond)
        self.transformer(**inputs, return_dict=False)

    def forward(self, x_src: torch.Tensor, sigma_src: torch.Tensor, cond: Cond):
        B, C, H, W = x_src.shape
        sigma_src = sigma_src.reshape(-1).expand(B)
        self._trunk(x_src, sigma_src, cond)
        hidden, temb = self.family.head_inputs(self.tail, self._taps, self.transformer)  # (B,T,D), (B,E)
        dtype = next(self.head.parameters()).dtype
        hidden, temb = hidden.to(dtype), temb.to(dtype)
        if isinstance(self.head, GMHead):
            means, logweights, logstd = self.head(hidden, temb)  # (B,T,K,F), (B,T,K,P), (B,)
            K = means.shape[2]
            means = self._untokenize(means, H, W).view(B, K, C, H, W)
            logweights = self._untokenize(logweights, H, W).view(B, K, 1, H, W)
            return means.float(), logweights.float(), logstd.float()
        u_grid = self.head(hidden)  # (B,T,N,F)
        N = u_grid.shape[2]
        return (self._untokenize(u_grid, H, W).view(B, N, C, H, W).float(),)

    def _untokenize(self, t: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """(B, T, M, F) per-token outputs of M components -> (B*M, F/p^2, H, W) via the family's un-packing."""
        B, T, M, F = t.shape
        return self.family.unpack(t.permute(0, 2, 1, 3).reshape(B * M, T, F), H, W)

    def policy_from_outputs(self, outputs, x_src: torch.Tensor, sigma_src: torch.Tensor):
        from models.policies import DXPolicy, GMPolicy, dx_x0_from_u

        B = x_src.shape[0]
        sigma_src = sigma_src.reshape(-1).expand(B).float()
        x_src = x_src.float()
        if isinstance(self.head, GMHead):
            means, logweights, logstd = outputs
            return GMPolicy(means, logweights, logstd.view(B, 1, 1, 1, 1), x_src, sigma_src,
                            eps=self.cfg.policy.eps)
        (u_grid,) = outputs
        mode = self.cfg.policy.dx_mode
        x0_grid = dx_x0_from_u(u_grid, x_src, sigma_src, mode)  # (B,N,C,H,W)
        d = self.cfg.distill
        segment = self.cfg.policy.dx_segment_size or 1.0 / (d.nfe - 1 + d.final_step_scale)
        return DXPolicy(x0_grid, x_src, sigma_src, torch.full((B,), segment, device=x_src.device), d.shift,
                        mode=mode)

    def make_policy(self, x_src: torch.Tensor, sigma_src: torch.Tensor, cond: Cond):
        return self.policy_from_outputs(self(x_src, sigma_src, cond), x_src, sigma_src)

    def mean_velocity(self, x_src: torch.Tensor, sigma_src: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The mixture-mean velocity sum_k w_k m_k (GM) or the DX velocity at tau_src (the last grid point, or
        the constant polynomial coefficient): (B,C,H,W)."""
        out = self(x_src, sigma_src, cond)
        if isinstance(self.head, GMHead):
            means, logweights, _ = out
            return (logweights.exp() * means).sum(dim=1)
        return out[0][:, 0 if self.cfg.policy.dx_mode == "polynomial" else -1]

    # ----------------------------------------------------------------------- teacher through this trunk
    @contextlib.contextmanager
    def adapters_disabled(self):
        has_lora = any("lora_" in n for n, _ in self.transformer.named_parameters())
        if has_lora:
            self.transformer.disable_adapters()
        try:
            yield
        finally:
            if has_lora:
                self.transformer.enable_adapters()

    @torch.no_grad()
    def base_velocity(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The teacher's unguided velocity computed with this trunk (adapters off) and the frozen output layers."""
        with self.adapters_disabled():
            self._trunk(x_t, sigma.reshape(-1).expand(x_t.shape[0]), cond)
            tokens = self.family.teacher_tokens(self.teacher_tail, self._taps, self.transformer)
        return self.family.tokens_to_velocity(tokens, x_t).float()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_transformer_student(family, cfg: Config, teacher=None,
                              network: nn.Module | None = None) -> TransformerStudent:
    """The student for `cfg`, built by `family` (a TransformerFamily). `teacher` (a models.teacher.Teacher) supplies the base weights: shared with it in
    LoRA `shared` placement (the teacher is rebound to this trunk with adapters disabled), copied otherwise.
    Without a teacher (separate placement on a student rank) the base is loaded from the config."""
    shared = cfg.teacher.placement == "shared"
    if shared and not cfg.lora.enabled:
        raise ValueError("teacher.placement=shared needs lora.enabled (the teacher is the LoRA base)")
    if network is None:
        if teacher is not None and teacher.network is not None:
            network = teacher.network if shared else copy.deepcopy(teacher.network)
        else:
            network = family.load_network(cfg)
    if cfg.lora.enabled:
        network.requires_grad_(False)
    else:
        if network_dtype(network) != torch.float32:
            network = network.float()  # full fine-tune: fp32 master weights
        network.requires_grad_(True)

    removed, taps = family.install_taps(network)
    C = cfg.model.latent_channels
    proj = family.velocity_proj(removed[family.proj_module.replace(".", "_")], C)
    p = family.patch_size(network)
    generator = torch.Generator().manual_seed(cfg.run.seed + 1)
    if cfg.policy.type == "gm":
        head = GMHead.from_teacher_proj(
            proj, cfg.policy.num_components, p * p, cond_dim=proj.in_features,
            channel_index=family.channel_index(C, p), bias_noise=cfg.policy.init_bias_noise,
            logstd_inner_dim=cfg.policy.logstd_inner_dim, init_logstd=cfg.policy.init_logstd, generator=generator)
    else:
        head = DXHead.from_teacher_proj(proj, cfg.policy.num_grid, cfg.policy.dx_mode)
    head = head.float()
    tail = nn.ModuleDict({k.replace(".", "_"): copy.deepcopy(removed[k.replace(".", "_")]).float()
                          for k in family.student_tail_modules()})
    tail.requires_grad_(True)

    if cfg.lora.enabled:
        from peft import LoraConfig

        if not hasattr(network, "add_adapter"):
            raise ValueError(f"lora.enabled: {type(network).__name__} (model.family={family.name}) has no PEFT "
                             "adapter support; train it fully (lora.enabled: false, teacher.placement: separate)")
        excluded = family.lora_excluded_modules(network, cfg.lora.target_modules)
        network.add_adapter(LoraConfig(
            r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=lora_target_regex(cfg.lora.target_modules, excluded),
            init_lora_weights="gaussian" if cfg.lora.init == "gaussian" else True,
        ))
        for name, param in network.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()  # trainables in fp32, the frozen base stays in its dtype
                param.requires_grad_(True)
    if cfg.model.gradient_checkpointing:  # the one place it is turned on; the engines verify it (trainer/engine.py)
        if not getattr(network, "_supports_gradient_checkpointing", False):
            raise ValueError(f"model.gradient_checkpointing: true, but {type(network).__name__} (model.family="
                             f"{family.name}) does not support activation checkpointing; set it to false")
        network.enable_gradient_checkpointing()
    family.prepare_student_network(network)

    student = TransformerStudent(family, cfg, network, taps, head, tail, removed)
    if shared and teacher is not None:
        teacher.network = None  # the student owns the trunk now
        teacher.velocity_fn = student.base_velocity
    return student
