"""Time plan of a recipe on a cluster (issue 23, docs/performance.md): predicted seconds per iteration split into
student compute, teacher compute, all-gathers, reduce-scatters and data, and the run's wall-clock and GPU-hours,
for each placement of the frozen base.

- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one student forward + backward (checkpoint recompute
  included) and one teacher forward of the real student built on the `meta` device (nothing allocated), at
  reduced depth (every block stack at depth 1, then one stack at depth 2) and scaled to the full depth by blocks.
- Bytes: per iteration and rank, from the planned partitions of the same meta student (`comm_bytes`): every
  ZeRO-3 parameter of a module is gathered whenever DeepSpeed fetches that module (forward, checkpoint
  recompute, backward), padded to a multiple of its partition group. `benchmarks/comm_volume.py` measures the
  same bytes on CPU and a test checks they agree.
- Seconds: FLOPs / (peak bf16 x `mfu`), bytes / (link bandwidth x `LINK_EFFICIENCY`) with the ring factor
  (p - 1) / p, the link being NVLink inside a node and the per-GPU network across nodes (`HARDWARE`). The compute
  side is an assumption until a GPU measures it (`mfu`); the byte counts are not.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.config import Config, ConfigError
from trainer.planner.memory import FROZEN_PLACEMENTS, build_meta_network, frozen_group_size


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops: float  # dense bf16 tensor-core peak
    hbm_gb: float  # memory per GPU (1e9 bytes)
    intra_gbs: float  # NVLink, GB/s per GPU per direction
    inter_gbs: float  # network between nodes, GB/s per GPU per direction (one NIC per GPU)
    source: str


# Vendor datasheet numbers (dense, no sparsity); networks as in the DGX/HGX reference nodes.
HARDWARE = {
    "H100": Hardware("H100 SXM5 80GB", 989.0, 80.0, 450.0, 50.0,
                     "989 TFLOP/s bf16 dense; NVLink 4 900 GB/s bidirectional; 8x ConnectX-7 400 Gb/s per node"),
    "H200": Hardware("H200 SXM 141GB", 989.0, 141.0, 450.0, 50.0,
                     "989 TFLOP/s bf16 dense; NVLink 4 900 GB/s bidirectional; 8x ConnectX-7 400 Gb/s per node"),
    "A100": Hardware("A100 SXM4 80GB", 312.0, 80.0, 300.0, 25.0,
                     "312 TFLOP/s bf16 dense; NVLink 3 600 GB/s bidirectional; 8x ConnectX-6 200 Gb/s per node"),
}
LINK_EFFICIENCY = 0.8  # NCCL's bus bandwidth on large messages, as a fraction of the link rate
DEFAULT_MFU = 0.40  # issue 23's target model-FLOPs utilisation; NOT measured (no GPU this session)
PCIE_GBS = 25.0  # host -> GPU copy of a batch's prompt embeddings (PCIe 4 x16, achieved)

# config keys of each family's block stacks (the FLOP count scales them)
DEPTH_KEYS = {"flux": ("num_layers", "num_single_layers"), "qwen_image": ("num_layers",), "dit": ("num_layers",),
              "digits": ("num_layers", "num_single_layers")}


@dataclass
class Cluster:
    nodes: int
    gpus_per_node: int
    hardware: Hardware
    gpu_mem_gib: float

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        return f"{self.nodes}x{self.gpus_per_node}x{self.hardware.name} ({self.gpu_mem_gib:.1f} GiB each)"


def parse_cluster(text: str, cfg: Config | None = None) -> Cluster:
    """'2x8xH100' -> 2 nodes of 8 H100s. Without text, the recipe's `cluster.nodes` x `cluster.gpus_per_node`
    on H100s. `cluster.gpu_memory_gb`, when set, overrides the table's memory per GPU."""
    if not text:
        if cfg is None or not (cfg.cluster.nodes and cfg.cluster.gpus_per_node):
            raise ConfigError("piflow plan: give --cluster NODESxGPUSxKIND (e.g. 2x8xH100) or set cluster.nodes and "
                              "cluster.gpus_per_node in the recipe")
        text = f"{cfg.cluster.nodes}x{cfg.cluster.gpus_per_node}xH100"
    m = re.fullmatch(r"(\d+)x(\d+)x([A-Za-z0-9]+)", text.strip())
    if not m or m.group(3).upper() not in HARDWARE or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ConfigError(f"piflow plan: --cluster {text!r}: expected NODESxGPUSxKIND with KIND one of "
                          f"{', '.join(HARDWARE)} (e.g. 2x8xH100)")
    hw = HARDWARE[m.group(3).upper()]
    mem_gb = cfg.cluster.gpu_memory_gb if cfg is not None and cfg.cluster.gpu_memory_gb > 0 else hw.hbm_gb
    return Cluster(int(m.group(1)), int(m.group(2)), hw, mem_gb * 1e9 / 2**30)


# ------------------------------------------------------------------------------------------ the meta student
def meta_student(cfg: Config, depths: dict[str, int] | None = None) -> nn.Module:
    """The student of `cfg` (trunk, LoRA, head, tail) on the meta device, optionally at other block depths."""
    from models.families import get_family

    net = build_meta_network(cfg)
    if depths:
        kwargs = {k: v for k, v in net.config.items() if not k.startswith("_")}
        with torch.device("meta"):
            net = type(net)(**{**kwargs, **depths})
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    with _quiet():
        net = net.to(dtype)
        student = get_family(cfg.model.family).build_student(cfg, teacher=None, network=net)
    return student


@contextlib.contextmanager
def _quiet():
    import logging

    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def meta_inputs(cfg: Config, student: nn.Module, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """x_src (B,C,H,W), sigma (B,) and the conditioning of one sample with the recipe's text length, on meta."""
    from models.families import get_family

    family = get_family(cfg.model.family)
    C, H, W = family.latent_shape(cfg)
    net = student.transformer.config
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    T = cfg.model.max_sequence_length
    meta = dict(device="meta", dtype=dtype)
    if cfg.model.family in ("flux", "digits"):
        cond = {"prompt_embeds": torch.empty(batch, T, net["joint_attention_dim"], **meta),
                "pooled_prompt_embeds": torch.empty(batch, net["pooled_projection_dim"], **meta)}
    elif cfg.model.family == "qwen_image":
        cond = {"prompt_embeds": torch.empty(batch, T, net["joint_attention_dim"], **meta),
                "prompt_embeds_mask": torch.ones(batch, T, dtype=torch.long, device="meta")}
    elif cfg.model.family == "dit":
        cond = {"class_labels": torch.zeros(batch, dtype=torch.long, device="meta")}
    else:
        raise ConfigError(f"piflow plan: no time plan for model.family={cfg.model.family!r} (flux, qwen_image, dit)")
    return (torch.empty(batch, C, H, W, device="meta"), torch.full((batch,), 0.5, device="meta"), cond)


# ------------------------------------------------------------------------------------------ FLOPs
@dataclass
class Flops:
    student: float  # one sample: forward + backward (+ checkpoint recompute)
    teacher: float  # one sample: one teacher forward (adapters off)


def _pass_flops(cfg: Config, depths: dict[str, int]) -> Flops:
    from torch.utils.flop_counter import FlopCounterMode

    student = meta_student(cfg, depths)
    x, sigma, cond = meta_inputs(cfg, student)
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            student.base_velocity(x, sigma, cond)
    teacher = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        out = student(x, sigma, cond)
        sum(o.float().sum() for o in out).backward()
    return Flops(float(fc.get_total_flops()), float(teacher))


def count_flops(cfg: Config) -> Flops:
    """Per-sample FLOPs at the recipe's full depth: counted at depth 1 per stack and with one stack at depth 2,
    then scaled by the real number of blocks (the blocks of a stack are identical)."""
    keys = DEPTH_KEYS.get(cfg.model.family)
    if keys is None:
        raise ConfigError(f"piflow plan: no time plan for model.family={cfg.model.family!r}")
    full = {k: int(build_meta_network(cfg).config[k]) for k in keys}
    ones = {k: 1 for k in keys}
    base = _pass_flops(cfg, ones)
    student, teacher = base.student, base.teacher
    for k in keys:
        more = _pass_flops(cfg, {**ones, k: 2})
        student += (full[k] - 1) * (more.student - base.student)
        teacher += (full[k] - 1) * (more.teacher - base.teacher)
    return Flops(student, teacher)


# ------------------------------------------------------------------------------------------ bytes
@dataclass
class PassParams:
    """Parameters DeepSpeed fetches in each kind of pass of one data-free segment (names of the meta student)."""

    forward: list[str] = field(default_factory=list)  # the student forward (and a recompute outside blocks: none)
    recompute: list[str] = field(default_factory=list)  # checkpointed blocks run again in the backward
    backward: list[str] = field(default_factory=list)  # modules the gradient flows through
    teacher: list[str] = field(default_factory=list)  # one teacher forward (adapters off)


def trace_passes(cfg: Config) -> tuple[nn.Module, PassParams]:
    """Which parameters each pass fetches, traced on the meta student at the recipe's depth with DeepSpeed's
    rule: a module's own parameters are fetched when its forward runs (again when a checkpointed block is
    recomputed in the backward) and when the gradient reaches its outputs."""
    student = meta_student(cfg)
    x, sigma, cond = meta_inputs(cfg, student)
    trace: dict[str, list[str]] = {"forward": [], "recompute": [], "backward": [], "teacher": []}
    phase = ["forward"]
    owners = {m: [f"{n}.{p}".lstrip(".") for p, _ in m.named_parameters(recurse=False)]
              for n, m in student.named_modules()}
    for n, m in student.named_modules():
        # peft's LoRA Linear reads `lora_A[adapter].weight.dtype` in its own forward: ZeRO-3 then registers that
        # weight as an external parameter of the LoRA layer and gathers it with the layer from then on, also
        # when the adapters are off (the teacher's passes); measured by benchmarks/comm_volume.py
        if isinstance(getattr(m, "lora_A", None), nn.ModuleDict):
            owners[m] = owners[m] + [f"{n}.lora_A.{k}.weight" for k in m.lora_A.keys()]
    handles = []

    def pre(module, args):
        if owners[module]:
            in_backward = torch._C._current_graph_task_id() != -1
            trace["recompute" if in_backward else phase[0]].extend(owners[module])

    def post(module, args, output):
        if not owners[module] or phase[0] == "teacher":
            return
        outs = [t for t in (output if isinstance(output, (tuple, list)) else (output,))
                if torch.is_tensor(t) and t.requires_grad]
        fired = [False]

        def on_grad(grad):
            if not fired[0]:  # one fetch per forward call, however many outputs
                fired[0] = True
                trace["backward"].extend(owners[module])
            return grad

        for t in outs:
            t.register_hook(on_grad)

    for m in student.modules():
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        out = student(x, sigma, cond)
        sum(o.float().sum() for o in out).backward()
        phase[0] = "teacher"
        with torch.no_grad():
            student.base_velocity(x, sigma, cond)
    finally:
        for h in handles:
            h.remove()
    return student, PassParams(**trace)


def teacher_forwards_per_segment(cfg: Config) -> int:
    """Teacher forwards of one data-free segment: one per intermediate query (CFG runs both branches in one)."""
    return cfg.distill.num_intermediate


def comm_bytes(cfg: Config, world: int, gpus_per_node: int, frozen: str, trainable: str,
               traced: tuple[nn.Module, PassParams] | None = None) -> dict[str, float]:
    """Bytes all-gathered and reduce-scattered per iteration on one rank (the gathered / reduced tensors), split
    like `benchmarks/comm_volume.py` counts them: gather_frozen, gather_trainable, reduce_scatter, and the parts
    of them whose group spans more than one node (`*_cross_node`). `traced`: `trace_passes(cfg)`, reused."""
    if frozen not in FROZEN_PLACEMENTS or trainable not in ("per_step", "per_pass"):
        raise ConfigError(f"comm_bytes: unknown layout {frozen!r} / {trainable!r}")
    student, passes = traced or trace_passes(cfg)
    params = dict(student.named_parameters())
    elem = 2 if cfg.train.precision == "bf16" else 4
    nodes = math.ceil(world / max(1, gpus_per_node))
    if not cfg.lora.enabled:
        frozen = "shard"
    group_frozen = frozen_group_size(frozen, world, gpus_per_node)

    def padded(name: str, group: int) -> int:
        return math.ceil(params[name].numel() / group) * group * elem

    def gathered(names: list[str], want_trainable: bool) -> float:
        total = 0
        for n in names:
            p = params[n]
            if p.requires_grad != want_trainable:
                continue
            group = world if p.requires_grad else group_frozen
            if group > 1:
                total += padded(n, group)
        return float(total)

    micro = cfg.train.micro_batch_size or max(1, cfg.train.batch_size // world)
    accum = max(1, cfg.train.batch_size // (micro * world))
    segments = cfg.distill.nfe * accum if cfg.distill.data_free else accum
    teachers = teacher_forwards_per_segment(cfg)
    fwd, rec, bwd, tea = (set(getattr(passes, k)) for k in ("forward", "recompute", "backward", "teacher"))
    # one segment: the student forward, the checkpoint recompute, the backward, the teacher forwards. A frozen
    # weight a recompute gathered stays gathered through its block's backward (DeepSpeed keeps the
    # parameters of a recompute for the backward that asked for it; only trainables are released and gathered
    # again), so it is gathered once less.
    per_segment = list(fwd) + list(rec) + [n for n in bwd if params[n].requires_grad or n not in rec]
    frozen_bytes = 0.0 if frozen == "replicate" else segments * (
        gathered(per_segment, False) + teachers * gathered(list(tea), False))
    trainable_all = float(sum(padded(n, world) for n, p in params.items() if p.requires_grad)) if world > 1 else 0.0
    if trainable == "per_step":
        train_gather, reduce = trainable_all, trainable_all  # one gather after the step, one reduce-scatter
    else:
        train_gather = segments * (gathered(per_segment, True) + teachers * gathered(list(tea), True))
        reduce = segments * trainable_all
    cross_frozen = frozen_bytes if (nodes > 1 and frozen == "shard") else 0.0
    cross = 1.0 if nodes > 1 else 0.0
    return {"gather_frozen": frozen_bytes, "gather_trainable": train_gather, "reduce_scatter": reduce,
            "gather_frozen_cross_node": cross_frozen, "gather_trainable_cross_node": cross * train_gather,
            "reduce_scatter_cross_node": cross * reduce}


# ------------------------------------------------------------------------------------------ seconds
def _ring_seconds(nbytes: float, group: int, gbs: float) -> float:
    """A ring all-gather / reduce-scatter moves (p - 1) / p of the tensor through each rank's link."""
    if group <= 1 or nbytes <= 0:
        return 0.0
    return nbytes * (group - 1) / group / (gbs * 1e9 * LINK_EFFICIENCY)


@dataclass
class TimeRow:
    frozen: str
    trainable: str
    seconds: dict[str, float]
    bytes: dict[str, float]
    memory_gib: float
    fits: bool

    @property
    def compute_s(self) -> float:
        return self.seconds["student compute"] + self.seconds["teacher compute"]

    @property
    def comm_s(self) -> float:
        return self.seconds["all-gathers"] + self.seconds["reduce-scatters"]

    @property
    def serial_s(self) -> float:
        return self.compute_s + self.comm_s + self.seconds["data"]

    @property
    def overlapped_s(self) -> float:
        return max(self.compute_s, self.comm_s) + self.seconds["data"]


@dataclass
class TimePlan:
    cluster: Cluster
    flops: Flops
    mfu: float
    student_gpus: int
    micro_batch: int
    rows: list[TimeRow]
    chosen: str  # the placement `train.frozen_weights` takes on this cluster


def make_time_plan(cfg: Config, cluster: Cluster, mfu: float = DEFAULT_MFU) -> TimePlan:
    """Seconds per iteration on `cluster` for each frozen-weight placement (shared placement: every GPU is a
    student rank; separate placement: the teacher GPUs are taken first, as `piflow plan` counts them)."""
    from trainer.planner.memory import count_model, make_plan, student_row

    if not 0 < mfu <= 1:
        raise ConfigError(f"piflow plan: --mfu {mfu} is outside (0, 1]")
    plan = make_plan(cfg, cluster.gpus, cluster.gpu_mem_gib, cluster.gpus_per_node)
    world, hw = plan.student_gpus, cluster.hardware
    flops = count_flops(cfg)
    samples = cfg.train.batch_size / world  # prompts per GPU per iteration
    segments = cfg.distill.nfe if cfg.distill.data_free else 1
    cfg_factor = 2 if cfg.teacher.guidance.mode == "cfg" else 1
    peak = hw.peak_tflops * 1e12 * mfu
    student_s = segments * samples * flops.student / peak
    teacher_s = (segments * teacher_forwards_per_segment(cfg) * samples * cfg_factor * flops.teacher / peak
                 if cfg.teacher.placement == "shared" else 0.0)
    data_s = samples * _prompt_bytes(cfg) / (PCIE_GBS * 1e9)
    traced = trace_passes(cfg)
    counts = count_model(cfg)
    rows = []
    trainable = plan.layout.trainable if cfg.train.trainable_comm == "auto" else cfg.train.trainable_comm
    layouts = [(f, trainable) for f in (FROZEN_PLACEMENTS if cfg.lora.enabled else ("shard",))]
    if ("shard", "per_pass") not in layouts:
        layouts.append(("shard", "per_pass"))  # the layout before issue 23, for comparison
    for frozen, trainable in layouts:
        b = comm_bytes(cfg, world, cluster.gpus_per_node, frozen, trainable, traced)
        group = frozen_group_size(frozen, world, cluster.gpus_per_node)
        frozen_bw = hw.inter_gbs if group > cluster.gpus_per_node else hw.intra_gbs
        world_bw = hw.inter_gbs if world > cluster.gpus_per_node else hw.intra_gbs
        gathers = _ring_seconds(b["gather_frozen"], group, frozen_bw) + _ring_seconds(b["gather_trainable"], world,
                                                                                         world_bw)
        seconds = {"student compute": student_s, "teacher compute": teacher_s, "all-gathers": gathers,
                   "reduce-scatters": _ring_seconds(b["reduce_scatter"], world, world_bw), "data": data_s}
        row = student_row(cfg, counts, world, "lora" if cfg.lora.enabled else "full",
                          cfg.model.gradient_checkpointing, plan.tokens, plan.micro_batch,
                          cfg.teacher.placement == "shared", frozen, trainable, cluster.gpus_per_node)
        rows.append(TimeRow(frozen, trainable, seconds, b, row.total_gib, row.total_gib <= cluster.gpu_mem_gib))
    return TimePlan(cluster, flops, mfu, world, plan.micro_batch, rows, plan.layout.frozen)


def _prompt_bytes(cfg: Config) -> float:
    """Bytes of one prompt's pre-encoded embeddings (bf16) copied to the GPU: the text tokens at the joint
    width (FLUX also its pooled vector); a class label for DiT."""
    if cfg.model.family == "dit":
        return 8.0
    net = build_meta_network(cfg).config
    return 2.0 * (cfg.model.max_sequence_length * net.get("joint_attention_dim", 0) + net.get("pooled_projection_dim", 0))


def format_time_plan(tp: TimePlan, cfg: Config) -> str:
    c = tp.cluster
    n_int = teacher_forwards_per_segment(cfg)
    lines = [
        f"time plan on {c.describe()}: {tp.student_gpus} student GPUs, {cfg.train.batch_size // tp.student_gpus} "
        f"prompt(s) per GPU per iteration, {cfg.distill.nfe} segments x {n_int} teacher forwards",
        f"FLOPs per sample (FlopCounterMode on the meta device, depth-scaled): student forward+backward"
        f"{' + recompute' if cfg.model.gradient_checkpointing else ''} {tp.flops.student / 1e12:.1f} TFLOP, "
        f"teacher forward {tp.flops.teacher / 1e12:.1f} TFLOP",
        f"assumed: {tp.mfu:.2f} of the {c.hardware.peak_tflops:g} TFLOP/s bf16 peak (MFU; NOT measured: no GPU "
        f"checked this), links at {LINK_EFFICIENCY:.0%} of NVLink {c.hardware.intra_gbs:g} / network "
        f"{c.hardware.inter_gbs:g} GB/s per GPU",
        "",
        f"{'seconds per iteration':<34}" + "".join(f"{r.frozen + '/' + r.trainable:>26}" for r in tp.rows),
    ]
    for key in tp.rows[0].seconds:
        lines.append(f"  {key:<32}" + "".join(f"{r.seconds[key]:>26.2f}" for r in tp.rows))
    lines.append(f"  {'total, comm not overlapped':<32}" + "".join(f"{r.serial_s:>26.2f}" for r in tp.rows))
    lines.append(f"  {'total, comm overlapped':<32}" + "".join(f"{r.overlapped_s:>26.2f}" for r in tp.rows))
    gb = lambda v: f"{v / 1e9:.1f}"  # noqa: E731
    lines.append(f"{'GB per iteration per GPU':<34}" + "".join(
        f"{gb(r.bytes['gather_frozen']) + ' + ' + gb(r.bytes['gather_trainable']) + ' AG, ' + gb(r.bytes['reduce_scatter']) + ' RS':>26}"
        for r in tp.rows))
    lines.append(f"{'  of which across nodes (GB)':<34}" + "".join(
        f"{gb(sum(v for k, v in r.bytes.items() if k.endswith('_cross_node'))):>26}" for r in tp.rows))
    lines.append(f"{'memory per GPU (GiB)':<34}" + "".join(
        f"{f'{r.memory_gib:.1f} ' + ('fits' if r.fits else 'DOES NOT FIT'):>26}" for r in tp.rows))
    gpus = c.gpus
    for label, fn in (("comm not overlapped", lambda r: r.serial_s), ("comm overlapped", lambda r: r.overlapped_s)):
        cells = [f"{fn(r) * cfg.train.iters / 3600:.1f} h = {fn(r) * cfg.train.iters * gpus / 3600:.0f} GPU-h"
                 for r in tp.rows]
        lines.append(f"{f'{cfg.train.iters} iterations, {label}':<34}" + "".join(f"{x:>26}" for x in cells))
    lines.append(f"train.frozen_weights={cfg.train.frozen_weights} takes: {tp.chosen}"
                 + ("" if cfg.lora.enabled else " (full fine-tune: no frozen base)"))
    lines.append("note: bytes count one gather per use, as DeepSpeed does without prefetch (benchmarks/comm_volume.py "
                 "measures the same on CPU); with prefetch it keeps some sharded weights gathered, so sharded columns "
                 "are an upper bound. Seconds from bytes assume the links above, compute seconds the MFU above")
    return "\n".join(lines)
