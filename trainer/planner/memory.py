"""Memory and placement plan for a config on N GPUs, without allocating anything.

The teacher architecture is built on the `meta` device (each family's `public_config`: FLUX.1-dev, Qwen-Image,
DiT-XL/2, ...; a tiny model for `model.tiny`), parameters are counted per module, and the per-GPU memory of the
student group (DeepSpeed ZeRO-3 partitions parameters, gradients and optimizer states over the student GPUs)
and of the teacher group is estimated for full fine-tuning and for LoRA, with and without activation
checkpointing. The model (bytes per parameter, activation constants) is written out in `BYTES` and
`activation_bytes` so a reader can check every number.

It also decides where a LoRA run's weights live (issue 23, docs/performance.md): `resolve_layout` picks the
frozen base's placement (`train.frozen_weights`: replicated, sharded within a node, sharded over all ranks) and
the trainables' communication (`train.trainable_comm`) as the first choice whose memory row fits the GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from trainer.config import Config, ConfigError

GiB = 1024 ** 3
# Bytes per parameter. Trainable: bf16 weights + bf16 grads + fp32 master + Adam m, v (fp32, or 8-bit) + fp32 EMA.
BYTES = {"weight": 2, "grad": 2, "master": 4, "adam": 8, "adam8bit": 2, "ema": 4, "frozen": 2}
# Activation bytes per token per hidden unit of one transformer block in bf16 with flash attention (no stored
# attention matrix): ~34 for an attention + 4x MLP block (Korthikanti et al., 2022, "Reducing Activation
# Recomputation in Large Transformer Models"); with checkpointing a block keeps only its bf16 input (2).
ACT_FULL, ACT_CKPT = 34, 2
ACT_INFER = 20  # the transient peak of one block under no_grad (qkv, attention out, the 4x MLP hidden)
OVERHEAD_GIB = 2.5  # CUDA context, NCCL buffers, allocator fragmentation


@dataclass
class ModelCounts:
    family: str
    total: int  # all parameters of the teacher transformer
    lora: int  # LoRA parameters for cfg.lora (rank, targets)
    head: int  # GM/DX head
    norm_out: int  # the trainable output norm the LoRA student keeps
    largest_block: int  # parameters of the biggest block (ZeRO-3 gathers one or two at a time)
    num_blocks: int
    hidden: int
    describe: str = ""


FROZEN_PLACEMENTS = ("replicate", "shard_in_node", "shard")  # preference order of `train.frozen_weights: auto`
TRAINABLE_COMM = ("per_step", "per_pass")  # preference order of `train.trainable_comm: auto`
FROZEN_KEY = "frozen base (bf16)"


@dataclass
class PlanRow:
    mode: str  # "full" | "lora"
    checkpointing: bool
    parts_gib: dict[str, float] = field(default_factory=dict)
    frozen: str = "shard"  # where the frozen base lives (FROZEN_PLACEMENTS)
    trainable: str = "per_pass"  # TRAINABLE_COMM

    @property
    def total_gib(self) -> float:
        return sum(self.parts_gib.values())


@dataclass
class Plan:
    counts: ModelCounts
    gpus: int
    student_gpus: int
    teacher_gpus: int
    gpu_mem_gib: float
    micro_batch: int
    tokens: int
    student_rows: list[PlanRow]
    teacher_gib: float  # per teacher GPU (separate placement); 0 in shared placement
    notes: list[str]
    gpus_per_node: int = 0  # 0 = all student GPUs on one node
    layout: PlanRow | None = None  # the chosen row: this config's mode, placement and trainable communication

    def fits(self, row: PlanRow) -> bool:
        return row.total_gib <= self.gpu_mem_gib


# ------------------------------------------------------------------------------------------ counting
def build_meta_network(cfg: Config) -> nn.Module:
    """The family's transformer on the meta device: the real public config, or the tiny one for model.tiny."""
    from models.families import get_family
    from models.families.base import TransformerFamily

    family = get_family(cfg.model.family)
    public = getattr(family, "public_config", None)
    if not isinstance(family, TransformerFamily) or (public is None and not cfg.model.tiny):
        raise ConfigError(f"piflow plan: model.family={cfg.model.family!r} has no public transformer config to "
                          f"plan (a TransformerFamily with `public_config`)")
    kwargs = family.tiny_config(cfg) if cfg.model.tiny else public
    local = _local_config_dir(cfg)
    if local is not None:  # a local diffusers dir: plan what it holds
        kwargs = {k: v for k, v in family.transformer_class.load_config(str(local)).items() if not k.startswith("_")}
    with torch.device("meta"):
        return family.transformer_class(**kwargs)


def _local_config_dir(cfg: Config) -> Path | None:
    """model.pretrained's transformer dir when it is a local diffusers dir (a hub id plans the public config)."""
    local = Path(cfg.model.pretrained) / (cfg.model.subfolder or "")
    return local if cfg.model.pretrained and (local / "config.json").is_file() else None


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_parameter_count(network: nn.Module, targets: list[str], rank: int, excluded: list[str]) -> int:
    """r * (in + out) for every Linear whose name ends in `.<target>` (not a root module, not excluded)."""
    total = 0
    for name, module in network.named_modules():
        if isinstance(module, nn.Linear) and "." in name and name not in excluded \
                and any(name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total


def head_parameter_count(cfg: Config, proj: nn.Linear, patch: int, cond_dim: int) -> int:
    D, F = proj.in_features, proj.out_features
    if cfg.policy.type == "dx":
        N = cfg.policy.num_grid
        return D * N * F + N * F
    K, inner, P = cfg.policy.num_components, cfg.policy.logstd_inner_dim, patch * patch
    means = D * K * F + K * F
    logweights = D * K * P + K * P
    logstd = cond_dim * inner + inner + inner + 1
    return means + logweights + logstd


def count_model(cfg: Config) -> ModelCounts:
    return count_network(cfg, build_meta_network(cfg))


def count_network(cfg: Config, net: nn.Module) -> ModelCounts:
    """Parameter counts of a family transformer (on any device; meta for planning)."""
    from models.families import get_family

    family = get_family(cfg.model.family)
    blocks = [m for m in net.children() if isinstance(m, nn.ModuleList)]  # the transformer's block stacks
    block_sizes = [_numel(b) for lst in blocks for b in lst]
    patch = family.patch_size(net)
    proj = family.velocity_proj(net.get_submodule(family.proj_module), cfg.model.latent_channels)
    hidden = proj.in_features
    norm_out = sum(_numel(net.get_submodule(n)) for n in family.student_tail_modules())
    excluded = family.lora_excluded_modules(net, cfg.lora.target_modules)
    lora = lora_parameter_count(net, cfg.lora.target_modules, cfg.lora.rank, excluded) if cfg.lora.target_modules else 0
    return ModelCounts(
        family=cfg.model.family, total=_numel(net), lora=lora,
        head=head_parameter_count(cfg, proj, patch, hidden), norm_out=norm_out,
        largest_block=max(block_sizes) if block_sizes else _numel(net), num_blocks=len(block_sizes), hidden=hidden,
        describe=type(net).__name__ + (" (from model.pretrained)" if _local_config_dir(cfg) is not None
                                       else " (tiny)" if cfg.model.tiny else " (public config)"),
    )


# ------------------------------------------------------------------------------------------ memory
def sequence_tokens(cfg: Config) -> int:
    """Tokens one sample puts through the transformer: image tokens (+ text tokens for the T2I families)."""
    from models.families import get_family

    return get_family(cfg.model.family).sequence_tokens(cfg)


def activation_bytes(counts: ModelCounts, tokens: int, micro_batch: int, checkpointing: bool) -> float:
    """Training activations of ONE student forward (data-free pi-ID back-propagates every step at once)."""
    per_block_full = ACT_FULL * tokens * counts.hidden * micro_batch
    if checkpointing:
        return ACT_CKPT * tokens * counts.hidden * micro_batch * counts.num_blocks + per_block_full
    return per_block_full * counts.num_blocks


def trainable_state_bytes(n: int, eightbit: bool) -> float:
    adam = BYTES["adam8bit"] if eightbit else BYTES["adam"]
    return n * (BYTES["weight"] + BYTES["grad"] + BYTES["master"] + adam + BYTES["ema"])


def frozen_group_size(placement: str, n_gpus: int, gpus_per_node: int) -> int:
    """How many GPUs share one copy of the frozen base: 1 (replicate), a node, or all student GPUs."""
    if placement == "replicate":
        return 1
    if placement == "shard_in_node":
        return max(1, min(gpus_per_node or n_gpus, n_gpus))
    return n_gpus


def student_row(cfg: Config, counts: ModelCounts, n_gpus: int, mode: str, checkpointing: bool, tokens: int,
                micro_batch: int, shared_teacher: bool, frozen: str = "shard", trainable_comm: str = "per_pass",
                gpus_per_node: int = 0) -> PlanRow:
    """Per-GPU memory of one student rank. `frozen` places the LoRA base (replicated, sharded in a node or over
    all GPUs); `trainable_comm: per_step` keeps whole bf16 copies of the trainable weights and gradients."""
    eightbit = cfg.optim.eightbit
    if mode == "full":
        trainable, frozen_n = counts.total + counts.head, 0  # (the replaced proj_out is negligible)
    else:
        trainable, frozen_n = counts.lora + counts.head + counts.norm_out, counts.total
    group = frozen_group_size(frozen, n_gpus, gpus_per_node)
    # ZeRO-3 gathers up to two blocks at a time (the one computing, the one prefetched): the whole block when
    # it is partitioned, nothing of a replicated frozen base (its LoRA share is kept whole with per_step)
    gathered = counts.largest_block if (mode == "full" or group > 1) else 0
    parts = {
        FROZEN_KEY: frozen_n * BYTES["frozen"] / group / GiB,
        "trainable states (ZeRO-3 shard)": trainable_state_bytes(trainable, eightbit) / n_gpus / GiB,
        "ZeRO-3 gathered blocks (2 in flight)": 2 * gathered * BYTES["weight"] / GiB,
        "trainables kept whole (per_step)":
            (trainable * (BYTES["weight"] + BYTES["grad"]) / GiB) if trainable_comm == "per_step" else 0.0,
        "activations": activation_bytes(counts, tokens, micro_batch, checkpointing) / GiB,
        "overhead": OVERHEAD_GIB,
    }
    if shared_teacher:
        teacher_batch = micro_batch * cfg.distill.num_intermediate * _cfg_factor(cfg)
        parts["teacher forward (shared, no_grad)"] = ACT_INFER * tokens * counts.hidden * teacher_batch / GiB
    return PlanRow(mode=mode, checkpointing=checkpointing, parts_gib=parts,
                   frozen=frozen if mode == "lora" else "shard", trainable=trainable_comm)


def resolve_layout(cfg: Config, counts: ModelCounts, n_gpus: int, gpus_per_node: int, gpu_mem_gib: float | None,
                   tokens: int, micro_batch: int) -> PlanRow:
    """This config's memory row with `train.frozen_weights` and `train.trainable_comm` resolved: an explicit
    choice is kept; `auto` takes the first placement (replicate, shard_in_node, shard) and then the first
    trainable mode (per_step, per_pass) whose row fits `gpu_mem_gib` (None: unknown, e.g. CPU ranks: the
    first). When nothing fits, the most sharded row (the plan then says DOES NOT FIT)."""
    mode = "lora" if cfg.lora.enabled else "full"
    shared = cfg.teacher.placement == "shared"
    frozen = FROZEN_PLACEMENTS if cfg.train.frozen_weights == "auto" else (cfg.train.frozen_weights,)
    if mode == "full":
        frozen = ("shard",)  # no frozen base: the whole trunk trains and is ZeRO-3 sharded
    trainable = TRAINABLE_COMM if cfg.train.trainable_comm == "auto" else (cfg.train.trainable_comm,)
    if cfg.train.prefetch_blocks == 0:
        trainable = ("per_pass",)  # per_step needs prefetch (config.validate)
    row = None
    for f in frozen:
        for t in trainable:
            row = student_row(cfg, counts, n_gpus, mode, cfg.model.gradient_checkpointing, tokens, micro_batch,
                              shared, f, t, gpus_per_node)
            if gpu_mem_gib is None or row.total_gib <= gpu_mem_gib:
                return row
    return row


def _cfg_factor(cfg: Config) -> int:
    return 2 if cfg.teacher.guidance.mode == "cfg" else 1


def make_plan(cfg: Config, gpus: int, gpu_mem_gib: float, gpus_per_node: int = 0) -> Plan:
    if gpus < 1:
        raise ConfigError(f"piflow plan: --gpus must be >= 1, got {gpus}")
    counts = count_model(cfg)
    shared = cfg.teacher.placement == "shared"
    per_replica = max(1, math.ceil(cfg.teacher.gpus_per_replica))
    teacher_gpus = 0 if shared else cfg.teacher.replicas * per_replica
    student_gpus = gpus - teacher_gpus
    notes = []
    if student_gpus < 1:
        raise ConfigError(f"piflow plan: {gpus} GPUs leave none for the student after {teacher_gpus} teacher GPUs "
                          f"(teacher.replicas={cfg.teacher.replicas} x {per_replica})")
    micro = cfg.train.micro_batch_size or max(1, cfg.train.batch_size // student_gpus)
    tokens = sequence_tokens(cfg)
    layout = resolve_layout(cfg, counts, student_gpus, gpus_per_node, gpu_mem_gib, tokens, micro)
    # the other rows (mode, checkpointing) with the layout this config resolved to where it applies: the
    # placement of a frozen base only exists for LoRA, whole trainables (per_step) only for small trainables
    rows = [student_row(cfg, counts, student_gpus, mode, ckpt, tokens, micro, shared, layout.frozen,
                        layout.trainable if mode == layout.mode else "per_pass", gpus_per_node)
            for mode in ("full", "lora") for ckpt in (True, False)]
    teacher_gib = 0.0
    if not shared:
        request = micro * cfg.distill.num_intermediate * _cfg_factor(cfg)  # r = 0: all n_int queries in one request
        teacher_gib = (counts.total * BYTES["frozen"] / per_replica
                       + ACT_INFER * tokens * counts.hidden * request) / GiB + OVERHEAD_GIB
        notes.append(f"teacher request = {micro} samples x {cfg.distill.num_intermediate} queries"
                     f"{' x 2 (CFG)' if _cfg_factor(cfg) == 2 else ''} = {request} latents")
    if shared:
        notes.append("teacher.placement=shared: the teacher is the student's frozen base (LoRA only); "
                     "the full fine-tune rows would need a separate teacher")
    if not cfg.lora.target_modules:
        notes.append("lora.target_modules is empty: the LoRA rows count heads + norm_out only")
    return Plan(counts, gpus, student_gpus, teacher_gpus, gpu_mem_gib, micro, tokens, rows, teacher_gib, notes,
                gpus_per_node, layout)


def format_plan(plan: Plan, cfg: Config) -> str:
    c = plan.counts
    lines = [
        f"model: {c.describe}: {c.total / 1e9:.2f}B parameters in {c.num_blocks} blocks "
        f"(largest {c.largest_block / 1e6:.1f}M), hidden {c.hidden}",
        f"student trainables: LoRA r={cfg.lora.rank} {c.lora / 1e6:.1f}M + {cfg.policy.type.upper()} head "
        f"{c.head / 1e6:.1f}M + norm_out {c.norm_out / 1e6:.1f}M; full fine-tune {(c.total + c.head) / 1e9:.2f}B",
        f"GPUs: {plan.gpus} = {plan.student_gpus} student (ZeRO-3) + {plan.teacher_gpus} teacher; "
        f"{plan.gpu_mem_gib:.4g} GiB each; micro-batch {plan.micro_batch}/GPU, {plan.tokens} tokens/sample",
        f"layout: frozen base {plan.layout.frozen if cfg.lora.enabled else '(none: full fine-tune)'}"
        f" (train.frozen_weights={cfg.train.frozen_weights}), trainables {plan.layout.trainable}"
        f" (train.trainable_comm={cfg.train.trainable_comm})",
        "",
        f"{'student per GPU (GiB)':<40}" + "".join(f"{_row_name(r):>14}" for r in plan.student_rows),
    ]
    for key in plan.student_rows[0].parts_gib:
        lines.append(f"  {key:<38}" + "".join(f"{r.parts_gib[key]:>14.2f}" for r in plan.student_rows))
    lines.append(f"  {'total':<38}" + "".join(f"{r.total_gib:>14.2f}" for r in plan.student_rows))
    lines.append(f"  {'verdict':<38}" + "".join(f"{'fits' if plan.fits(r) else 'DOES NOT FIT':>14}"
                                                  for r in plan.student_rows))
    lines.append("")
    if plan.teacher_gpus:
        verdict = "fits" if plan.teacher_gib <= plan.gpu_mem_gib else "DOES NOT FIT"
        lines.append(f"teacher per GPU (bf16 replica / {max(1, math.ceil(cfg.teacher.gpus_per_replica))} GPU(s) "
                     f"+ request activations + overhead): {plan.teacher_gib:.2f} GiB -> {verdict}")
    else:
        lines.append("teacher: shared with the student (no extra GPUs)")
    chosen = next(r for r in plan.student_rows
                  if r.mode == ("lora" if cfg.lora.enabled else "full")
                  and r.checkpointing == cfg.model.gradient_checkpointing)
    ok = plan.fits(chosen) and (not plan.teacher_gpus or plan.teacher_gib <= plan.gpu_mem_gib)
    lines.append(f"this config ({_row_name(chosen)}): " + ("FITS" if ok else
                 "DOES NOT FIT: add GPUs, enable LoRA or checkpointing, or lower the micro-batch"))
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _row_name(row: PlanRow) -> str:
    return f"{row.mode}{'+ckpt' if row.checkpointing else ''}"


def runtime_layout(cfg: Config, world: int, gpus_per_node: int, gpu_mem_gib: float | None) -> tuple[PlanRow, int]:
    """(the layout a run with `world` student ranks takes at startup, the largest block's parameter count or 0)
    for trainer/engine.py. `auto` plans the model on the meta device; a model the planner cannot count (no
    public config) takes the safest layout on a GPU (shard, per_pass), the cheapest where memory is unknown."""
    mode = "lora" if cfg.lora.enabled else "full"
    try:
        counts = count_model(cfg)
    except ConfigError:
        counts = None
    if counts is None or (cfg.train.frozen_weights != "auto" and cfg.train.trainable_comm != "auto"):
        safe = gpu_mem_gib is not None
        frozen = cfg.train.frozen_weights if cfg.train.frozen_weights != "auto" else (
            "shard" if safe else "replicate")
        trainable = cfg.train.trainable_comm if cfg.train.trainable_comm != "auto" else (
            "per_pass" if safe or cfg.train.prefetch_blocks == 0 else "per_step")
        row = PlanRow(mode, cfg.model.gradient_checkpointing, frozen=frozen if mode == "lora" else "shard",
                      trainable=trainable)
        return row, counts.largest_block if counts is not None else 0
    micro = cfg.train.micro_batch_size or max(1, cfg.train.batch_size // world)
    row = resolve_layout(cfg, counts, world, gpus_per_node, gpu_mem_gib, sequence_tokens(cfg), micro)
    return row, counts.largest_block
