"""The typed config tree: every default lives here, YAML files hold values only.

`load_config(path, overrides)` reads a YAML file, applies `key.sub=value` overrides and builds the tree.
Unknown keys, wrong types and values outside a closed choice fail before any work starts, with the key
path and the file name in the message.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the tree. The message names the file and key path."""


# ----------------------------------------------------------------------------------------------- sections
@dataclass
class RunConfig:
    name: str = "piflow"
    output: str = "runs/piflow"  # local dir or s3://bucket/prefix
    seed: int = 0
    force: bool = False  # start fresh on an output that already holds checkpoints
    # issue 11: node-local scratch (checkpoint staging, wandb files, hub cache, Ray Train's local dir);
    # "" = the node's system temp dir ($TMPDIR); $VARS expand on each node. Nothing under it is read by another
    # node; it may vanish with the node.
    scratch: str = ""
    # appending logs (metrics.jsonl, data_keys/) on object storage go up as numbered segments, flushed every
    # `log_flush_steps` steps (1..100000) or `log_flush_s` seconds (> 0), and at every checkpoint
    log_flush_steps: int = 20
    log_flush_s: float = 30.0
    # the single-writer lease on run.output (trainer/checkpoint/lease.py): renewed every `lease_heartbeat_s` (> 0);
    # a lease older than 3 heartbeats is stale and may be taken over
    lease_heartbeat_s: float = 30.0


@dataclass
class ModelConfig:
    family: str = "toy2d"  # a key of models.families.FAMILIES (flux, qwen_image, dit, toy2d, digits, ...)
    pretrained: str = ""  # diffusers-format dir or hub id of the teacher; "" = build from `tiny` config
    tiny: bool = False  # build a tiny randomly initialised model from config (tests, CPU demos)
    dtype: Literal["float32", "bfloat16"] = "float32"  # teacher / frozen-base weights
    num_timesteps: float = 1.0  # network timestep = sigma * num_timesteps (PIFLOW.md §1.1)
    latent_channels: int = 16
    latent_size: int = 128  # H = W of the un-packed latent the policy works on
    gradient_checkpointing: bool = False
    # issue 23: the attention kernel of the diffusers transformers (student and teacher): "auto" (torch SDPA's own
    # choice, cuDNN off on CUDA until measured) or a diffusers 0.42.1 dispatcher backend ("native",
    # "_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3", ...; docs/performance-gpu.md)
    attention_backend: str = "auto"
    # large families (models/families/{flux,qwen_image,dit}.py)
    subfolder: str = "transformer"  # of model.pretrained holding the teacher transformer
    text_encoder: str = ""  # diffusers-format dir or hub id with the text encoders/tokenizers; "" = model.pretrained
    max_sequence_length: int = 512  # text tokens (FLUX T5: 512; Qwen-Image: up to 1024)
    text_dtype: Literal["float32", "bfloat16"] = "float32"
    num_classes: int = 1000  # class-conditional families (DiT): class ids 0..n-1, the null class is n
    # toy2d only
    hidden_dim: int = 256
    num_layers: int = 4
    # the project's own small teachers (toy2d): flow matching with sigma ~ U(0, 1), cached by a hash of these
    teacher_iters: int = 8000
    teacher_batch_size: int = 2048
    teacher_lr: float = 2e-3
    teacher_seed: int = 0
    teacher_cache: str = ""  # "" = ~/.cache/piflow/teachers
    # non-square and video latents: the policy latent is (C, latent_frames * latent_size, latent_width); video
    # families fold the frames into the height axis (pi-Flow's math is per element)
    latent_width: int = 0  # 0 = latent_size (square)
    latent_frames: int = 1
    # an export dir (`piflow export` / `piflow import`) whose student tensors start the run (continued
    # distillation of a released or earlier student); a resume still restores its own checkpoint
    init_student: str = ""


@dataclass
class PolicyConfig:
    type: Literal["gm", "dx"] = "gm"
    num_components: int = 8  # K (GM)
    num_grid: int = 10  # N (DX)
    eps: float = 1e-6
    dropout: float = 0.1  # component dropout on the detached rollout copy (GM only)
    init_logstd: float = -2.995732273553991  # log(0.05), PIFLOW.md §2.2
    init_bias_noise: float = 0.05
    logstd_inner_dim: int = 1024
    dx_segment_size: float = 0.0  # 0 = 1/(nfe - 1 + final_step_scale)
    dx_mode: Literal["grid", "polynomial"] = "grid"  # DX: num_grid x0 points, or a polynomial of degree num_grid - 1


@dataclass
class DistillConfig:
    nfe: int = 4
    final_step_scale: float = 0.5
    shift: float = 3.2
    total_substeps: int = 128
    num_intermediate: int = 4  # n_int
    window_substeps: float = 3.0
    teacher_ratio_decay_iters: int = 0  # D; 0 = r is 0 from the start
    loss_scale: float = 30.0
    data_free: bool = True
    # data-free only: move the grid's interior segment boundaries per sample by U(-j, j) x the shorter adjacent
    # segment, so the student also learns sigma_src off the grid (sampling at more NFE than trained); 0 = grid
    boundary_jitter: float = 0.0


@dataclass
class GuidanceConfig:
    mode: Literal["none", "embedded", "cfg"] = "none"
    scale: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)  # sigma units; CFG only inside


@dataclass
class LoRAConfig:
    enabled: bool = False
    rank: int = 256
    alpha: float = 256.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)  # module-name suffixes (PIFLOW.md §5)
    init: Literal["gaussian", "kaiming"] = "gaussian"  # A ~ N(0, 1/r) or kaiming-uniform; B = 0 either way


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eightbit: bool = False  # bitsandbytes AdamW8bit (GPU only)
    warmup_iters: int = 100
    warmup_start_factor: float = 1e-3
    grad_clip: float = 50.0
    grad_clip_start: int = 100


@dataclass
class EMAConfig:
    gamma: float = 7.0
    start: int = 100


@dataclass
class TrainConfig:
    iters: int = 3000
    batch_size: int = 256  # global batch (prompts per iteration)
    micro_batch_size: int = 0  # per rank; 0 = batch_size / world size (no accumulation)
    precision: Literal["fp32", "bf16"] = "fp32"
    engine: Literal["torch", "deepspeed"] = "torch"  # torch: single process, no ZeRO (toy runs)
    # issue 23: torch.compile each repeated transformer block of student and teacher ("inductor": generated kernels;
    # "aot_eager": the same graph capture with eager kernels, to check a model compiles; no speed-up)
    compile: Literal["none", "inductor", "aot_eager"] = "none"
    log_every: int = 10
    ckpt_every: int = 500
    ckpt_keep_last: int = 2
    ckpt_keep_every: int = 0  # also keep every M-th step; 0 = off
    upload_queue: int = 2
    # issue 12: fault handling. Consecutive non-finite (skipped) steps before the run stops; consecutive
    # failed checkpoint uploads before the run stops; how long rank 0 waits for another rank's part.
    max_nonfinite_steps: int = 10
    max_failed_uploads: int = 2
    ckpt_part_timeout_s: float = 300.0
    # issue 23 (docs/performance.md): where a LoRA run's frozen base lives under train.engine=deepspeed.
    # replicate: a plain copy on every GPU (never gathered); shard_in_node: ZeRO-3 partitioned over the GPUs of
    # one node (gathers stay on NVLink); shard: partitioned over all ranks; auto: the first of these that the
    # memory plan says fits (trainer/planner/memory.py)
    frozen_weights: Literal["auto", "replicate", "shard_in_node", "shard"] = "auto"
    # issue 23: the trainable weights (LoRA, head, norm) gathered once after each optimizer step and kept, their
    # gradients accumulated locally and reduce-scattered once per step (per_step: costs a full bf16 copy of the
    # trainable weights and of their gradients per GPU), or ZeRO-3's default of a gather per forward/backward
    # and a reduce-scatter per backward (per_pass); auto = per_step when the memory plan says it fits
    trainable_comm: Literal["auto", "per_step", "per_pass"] = "auto"
    # issue 23: ZeRO-3's prefetch bucket in blocks of the planned model (the largest): on a GPU the next block's
    # gathers run while this block computes; 0 = no prefetch (every gather waits, on CPU the same either way)
    prefetch_blocks: float = 1.0


@dataclass
class TeacherConfig:
    placement: Literal["separate", "shared"] = "separate"
    replicas: int = 1  # TeacherServer actors (separate placement)
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    overlap: bool = True  # separate placement: next segment's student forward while the teacher computes
    max_batch: int = 256  # samples per teacher forward (requests from all ranks are concatenated up to this)
    # issue 23: queries per teacher network forward, in both placements (memory bound; CFG's two branches
    # run inside each forward); 0 = every query of a call in one forward (pi-ID: n_int x B per segment)
    micro_batch: int = 0
    batch_wait_ms: float = 2.0  # how long a request waits for others to join its batch
    # issue 7: a custom Ray resource each replica takes one unit of ("" = none), and how often Ray restarts
    # a dead replica (clients retry their in-flight requests on the restarted one)
    custom_resource: str = ""
    max_restarts: int = 3
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    # issue 12: a request unanswered for timeout_s means a hung replica: it is restarted, the request retried once
    timeout_s: float = 300.0


@dataclass
class StudentGroupConfig:
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    # issue 7: a custom Ray resource each worker takes one unit of ("" = none); nodes that advertise it
    # (`ray start --resources '{"NAME": n}'`) host at most n ranks, which pins or spreads the group.
    custom_resource: str = ""
    # issue 21: host memory Ray reserves per rank (its `memory` resource, GB; 0 = none): the resource preflight
    # and Ray's scheduler then keep a node from taking more ranks than its memory holds
    memory_gb_per_worker: float = 0.0
    # issue 21: how long Ray Train may take to place and start the worker group before the start counts as
    # failed (reported with what the cluster lacks)
    startup_timeout_s: float = 120.0
    # issue 21: after an infrastructure failure, how long the restart waits for the cluster to hold the group
    # again (a replacement node); then the run continues on the ranks that fit, global batch kept
    replacement_wait_s: float = 600.0


@dataclass
class DataConfig:
    shards: str = ""  # URL or brace pattern of prompt shards; "" = data-free without prompts (toy)
    workers: int = 1
    prefetch: int = 4  # pieces of shard visits (up to 64 samples each) a reader queues ahead, within max_memory_gb
    # issue 22: a DataWorker's memory (its process at start + the samples it read ahead, stored dtype) stays under
    # this; the reader waits instead of growing (the in-process reader: its read-ahead alone)
    max_memory_gb: float = 1.0
    max_prompt_chars: int = 2000
    overlong: Literal["truncate", "skip"] = "truncate"
    pre_encoded: bool = False
    # order (seed = run.seed): shards permuted per epoch, samples permuted per (epoch, shard)
    shuffle_shards: bool = True
    shuffle_within_shard: bool = True
    layout: Literal["strided", "contiguous"] = "strided"  # rank r of W keeps batch[r::W] or the r-th chunk
    read_attempts: int = 4  # per shard, with exponential backoff, before it is skipped and reported
    read_backoff_s: float = 0.5
    encode_batch_size: int = 64  # prompts per encoder call on a DataWorker
    # issue 12: a feed request or shard visit unanswered for timeout_s means a hung actor: it is killed,
    # restarted (up to max_restarts times, the BatchFeed and each DataWorker) and the request retried
    timeout_s: float = 900.0
    max_restarts: int = 5
    # issue 12: transient object-store errors (5xx, resets, timeouts) on a shard are retried with backoff for
    # this long before the shard is skipped; credential / permission errors stop the run at once
    retry_window_s: float = 120.0


@dataclass
class EvalConfig:
    every: int = 0  # 0 = off
    nfe: int = 4
    num_samples: int = 8
    prompts: list[str] = field(default_factory=list)
    seed: int = 0
    temperature: Literal["auto", "off"] = "auto"
    # issue 14: `piflow eval` on the newest valid checkpoint at a multiple of full_every steps, as a Ray job on
    # the teacher group's resources while training goes on (cluster/full_eval.py); 0 = off
    full_every: int = 0
    full_prompts: str = ""  # prompt file or shards (local or s3://); "" = eval.prompts
    full_teacher_steps: int = 50  # the teacher's Euler steps (the reference); the student uses eval.nfe
    full_seeds: int = 4  # images per prompt
    full_features: str = ""  # CLIP (flux, qwen_image) or image classifier (dit): hub id or dir; digits: built in
    full_wait_s: float = 1800.0  # after training: how long the driver waits for the last evaluation
    # issue 21: GPUs of the validation actor of shared placement (text encoders, VAE decode) when the run has
    # GPUs, outside the student ranks' memory plan; 0 = it runs on CPU. Separate placement uses teacher replica 0
    validation_gpus: float = 1.0


@dataclass
class ClusterConfig:
    address: str = "local"  # "local" starts an in-process Ray; otherwise a running cluster
    num_cpus: int = 0  # local Ray only; 0 = all
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # student process group; auto = nccl on GPU, else gloo
    data_cpus_per_worker: float = 1.0
    storage_path: str = ""  # Ray Train run dir; "" = <run.output>/ray_train (local output) or node-local scratch
    student: StudentGroupConfig = field(default_factory=StudentGroupConfig)
    # issue 11: a custom Ray resource ("" = none) the data feed and data workers each take 0.01 of: pins the
    # run's data plumbing to the nodes that advertise it (e.g. the head), away from nodes that may be lost
    data_custom_resource: str = ""
    # The node shape the recipe is written for (issue 21): templates size their nodes from it, the resource
    # preflight names it, the planner uses it. 0 = unspecified (a local or already-running cluster).
    nodes: int = 0  # nodes the run asks for
    gpus_per_node: int = 0
    cpus_per_node: int = 0
    memory_gb_per_node: float = 0.0  # host RAM
    gpu_memory_gb: float = 0.0  # per GPU (e.g. 80 for H100-80GB)


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "disabled"
    project: str = "piflow"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def hash(self) -> str:
        """Stable hash of the resolved config (checkpoints record it to detect a changed config on resume)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ loading
def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML at `path` (None = all defaults), apply `a.b=value` overrides, validate and return the tree."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{source}: cannot read config file ({e.strerror})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    for item in overrides:
        _apply_override(data, item)
    cfg = build(Config, data, path="", source=source)
    validate(cfg, source)
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    cfg = build(Config, data, path="", source=source)
    validate(cfg, source)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key segment")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {p} is a value, not a section")
        node = nxt
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def build(cls: type, data: Any, path: str, source: str) -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type."""
    where = path or "<top>"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping (section {cls.__name__}), got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(f"{source}: unknown key '{key}' (section {cls.__name__} has: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name, source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: key '{path}': expected {expected}, got {value!r} ({type(value).__name__})")

    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, source)
    if origin is Literal:
        if value not in args:
            raise fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path, source)
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise fail("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise fail(f"a list of {len(args)} values")
        return tuple(_coerce(a, v, f"{path}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        return [_coerce(args[0], v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    raise ConfigError(f"{source}: key '{path}': unsupported type {tp}")  # a bug in the tree, not the file


INF = float("inf")
SEED_MAX = 2**32 - 1
# issue 12: the range of every numeric key (dotted path -> interval "[lo, hi]", "(lo, hi]", ...). A tuple
# field's range applies to each element. tests/trainer/test_config_ranges.py checks that every int/float
# field of the tree is listed here; add the range of a new numeric field next to its key.
RANGES: dict[str, str] = {
    "run.seed": f"[0, {SEED_MAX}]", "run.log_flush_steps": "[1, 100000]", "run.log_flush_s": "(0, 86400]",
    "run.lease_heartbeat_s": "(0, 3600]", "model.latent_width": "[0, 65536]", "model.latent_frames": "[1, 4096]",
    "train.max_nonfinite_steps": "[1, 100000]", "train.max_failed_uploads": "[1, 100]",
    "train.ckpt_part_timeout_s": "[1, 86400]", "train.prefetch_blocks": "[0, 64]",
    "model.num_timesteps": "(0, 1e6]", "model.latent_channels": "[1, 4096]", "model.latent_size": "[1, 65536]",
    "model.max_sequence_length": "[1, 65536]", "model.num_classes": "[1, 1e9]", "model.hidden_dim": "[1, 1e6]",
    "model.num_layers": "[1, 1000]", "model.teacher_iters": "[0, 1e9]", "model.teacher_batch_size": "[1, 1e9]",
    "model.teacher_lr": "(0, 1]", "model.teacher_seed": f"[0, {SEED_MAX}]",
    "policy.num_components": "[1, 1024]", "policy.num_grid": "[1, 4096]", "policy.eps": "(0, 1)",
    "policy.dropout": "[0, 1)", "policy.init_logstd": "[-20, 5]", "policy.init_bias_noise": "[0, 10]",
    "policy.logstd_inner_dim": "[1, 1e6]", "policy.dx_segment_size": "[0, 1]",
    "distill.nfe": "[1, 1000]", "distill.final_step_scale": "(0, 1]", "distill.shift": "(0, 1000]",
    "distill.total_substeps": "[1, 1e6]", "distill.num_intermediate": "[1, 1e4]",
    "distill.window_substeps": "[0, 1e6]", "distill.teacher_ratio_decay_iters": "[0, 1e9]",
    "distill.loss_scale": "(0, 1e6]", "distill.boundary_jitter": "[0, 0.5)",
    "teacher.guidance.scale": "[0, 100]", "teacher.guidance.interval": "[0, 1]",
    "lora.rank": "[1, 65536]", "lora.alpha": "(0, 1e6]", "lora.dropout": "[0, 1)",
    "optim.lr": "(0, 1]", "optim.betas": "[0, 1)", "optim.weight_decay": "[0, 10]", "optim.warmup_iters": "[0, 1e9]",
    "optim.warmup_start_factor": "(0, 1]", "optim.grad_clip": "[0, 1e9]", "optim.grad_clip_start": "[0, 1e9]",
    "ema.gamma": "[0, 1000]", "ema.start": "[0, 1e9]",
    "train.iters": "[0, 1e9]", "train.batch_size": "[1, 1e7]", "train.micro_batch_size": "[0, 1e7]",
    "train.log_every": "[0, 1e9]", "train.ckpt_every": "[1, 1e9]", "train.ckpt_keep_last": "[1, 1e6]",
    "train.ckpt_keep_every": "[0, 1e9]", "train.upload_queue": "[1, 64]",
    "teacher.replicas": "[1, 1e4]", "teacher.gpus_per_replica": "[0, 64]", "teacher.cpus_per_replica": "[0, 1024]",
    "teacher.max_batch": "[1, 1e6]", "teacher.batch_wait_ms": "[0, 5000]", "teacher.max_restarts": "[0, 1000]",
    "teacher.micro_batch": "[0, 1e6]",
    "teacher.timeout_s": "[0, 86400]",
    "data.workers": "[1, 1024]", "data.prefetch": "[1, 1024]", "data.max_memory_gb": "[0.05, 1024]", "data.max_prompt_chars": "[0, 1e7]",
    "data.read_attempts": "[1, 100]", "data.read_backoff_s": "[0, 60]", "data.encode_batch_size": "[1, 1e5]",
    "data.timeout_s": "[0, 86400]", "data.max_restarts": "[0, 1000]", "data.retry_window_s": "[0, 86400]",
    "eval.every": "[0, 1e9]", "eval.nfe": "[1, 1000]", "eval.num_samples": "[1, 1e5]", "eval.seed": f"[0, {SEED_MAX}]",
    "eval.full_every": "[0, 1e9]", "eval.full_teacher_steps": "[1, 10000]", "eval.full_seeds": "[1, 10000]",
    "eval.full_wait_s": "[0, 86400]",
    "cluster.nodes": "[0, 1e5]", "cluster.gpus_per_node": "[0, 64]", "cluster.cpus_per_node": "[0, 1e5]",
    "cluster.memory_gb_per_node": "[0, 1e6]", "cluster.gpu_memory_gb": "[0, 1e4]",
    "cluster.num_cpus": "[0, 1e5]", "cluster.data_cpus_per_worker": "[0, 1024]",
    "cluster.student.workers": "[1, 1e5]", "cluster.student.gpus_per_worker": "[0, 64]",
    "cluster.student.cpus_per_worker": "[0, 1024]", "cluster.student.max_failures": "[0, 1000]",
    "cluster.student.memory_gb_per_worker": "[0, 1e5]", "cluster.student.startup_timeout_s": "[1, 86400]",
    "cluster.student.replacement_wait_s": "[0, 86400]", "eval.validation_gpus": "[0, 8]",
}


def parse_range(text: str) -> tuple[float, float, bool, bool]:
    """"[lo, hi)" -> (lo, hi, lo_closed, hi_closed)."""
    lo, hi = (float(v) for v in text[1:-1].split(","))
    return lo, hi, text[0] == "[", text[-1] == "]"


def in_range(value: float, text: str) -> bool:
    lo, hi, lo_closed, hi_closed = parse_range(text)
    return (lo <= value if lo_closed else lo < value) and (value <= hi if hi_closed else value < hi)


def numeric_fields(cls: type = None, prefix: str = "") -> list[str]:  # type: ignore[assignment]
    """Dotted keys of every int / float / tuple-of-numbers field of the tree."""
    cls = cls or Config
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += numeric_fields(tp, key + ".")
        elif tp in (int, float) or (typing.get_origin(tp) is tuple
                                     and all(a in (int, float) for a in typing.get_args(tp))):
            out.append(key)
    return out


def _check_ranges(cfg: Config, source: str) -> None:
    import math

    for key in numeric_fields():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        text = RANGES.get(key)
        for i, v in enumerate(value if isinstance(value, tuple) else (value,)):
            where = f"{key}[{i}]" if isinstance(value, tuple) else key
            if not math.isfinite(v):
                raise ConfigError(f"{source}: key '{where}': expected a finite number, got {v!r}")
            if text is not None and not in_range(v, text):
                raise ConfigError(f"{source}: key '{where}': {v!r} is outside {text}")


def validate(cfg: Config, source: str) -> None:
    """Cross-field checks that types alone cannot express."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: key '{key}': {msg}")

    from models.families import FAMILIES

    need(cfg.model.family in FAMILIES, "model.family", f"unknown family {cfg.model.family!r} "
         f"(one of {', '.join(FAMILIES)})")

    need(cfg.distill.nfe >= 1, "distill.nfe", "must be >= 1")
    need(0 < cfg.distill.final_step_scale <= 1, "distill.final_step_scale", "must be in (0, 1]")
    need(cfg.distill.shift > 0, "distill.shift", "must be > 0")
    need(cfg.distill.total_substeps >= 1, "distill.total_substeps", "must be >= 1")
    need(cfg.distill.num_intermediate >= 1, "distill.num_intermediate", "must be >= 1")
    need(cfg.distill.window_substeps >= 0, "distill.window_substeps", "must be >= 0")
    need(cfg.policy.num_components >= 1, "policy.num_components", "must be >= 1")
    need(cfg.policy.num_grid >= 1, "policy.num_grid", "must be >= 1")
    need(0 <= cfg.policy.dropout < 1, "policy.dropout", "must be in [0, 1)")
    need(cfg.train.iters >= 0, "train.iters", "must be >= 0")
    need(cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(cfg.train.micro_batch_size >= 0, "train.micro_batch_size", "must be >= 0")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.teacher.replicas >= 1, "teacher.replicas", "must be >= 1")
    need(cfg.cluster.student.workers >= 1, "cluster.student.workers", "must be >= 1")
    need(cfg.distill.data_free or cfg.distill.boundary_jitter == 0, "distill.boundary_jitter",
         "moves the data-free rollout's segment boundaries; data-based segments are drawn per sample from the "
         "grid: set it to 0 or distill.data_free=true")
    need(cfg.distill.data_free or bool(cfg.data.shards) or cfg.model.family == "toy2d", "distill.data_free",
         "false (data-based pi-ID) needs data.shards: latent shards made by `piflow shards latents`")
    if cfg.eval.full_every > 0:
        need(bool(cfg.eval.full_prompts or cfg.eval.prompts), "eval.full_prompts",
             "eval.full_every needs prompts: set eval.full_prompts (file or shards) or eval.prompts")
        need(cfg.model.family in ("digits", "flux", "qwen_image", "dit"), "eval.full_every",
             f"no evaluation features for the {cfg.model.family} family (digits, flux, qwen_image, dit)")
        need(cfg.model.family == "digits" or bool(cfg.eval.full_features), "eval.full_features",
             f"eval.full_every on the {cfg.model.family} family needs a feature network (CLIP for text-to-image, "
             "an image classifier for dit): a hub id or directory")
    if cfg.model.attention_backend != "auto":  # "auto" never imports diffusers (the toy family does not need it)
        from models.families.base import attention_backends

        need(cfg.model.attention_backend in attention_backends(), "model.attention_backend",
             f"unknown backend {cfg.model.attention_backend!r} (one of {', '.join(attention_backends())})")
    if cfg.teacher.placement == "shared":
        need(cfg.lora.enabled, "teacher.placement", "'shared' needs lora.enabled: true (the teacher is the LoRA base)")
    # DeepSpeed 0.19.8's module trace fails ("tracing error ... parameter fetch queue") with kept-gathered
    # trainables when nothing is prefetched (found by benchmarks/comm_volume.py)
    need(not (cfg.train.trainable_comm == "per_step" and cfg.train.prefetch_blocks == 0), "train.trainable_comm",
         "per_step needs train.prefetch_blocks > 0 (DeepSpeed 0.19.8 fails its trace check without prefetch); "
         "set train.trainable_comm=per_pass or auto")
    world = cfg.cluster.student.workers
    if cfg.train.micro_batch_size:
        need(
            cfg.train.batch_size % (cfg.train.micro_batch_size * world) == 0,
            "train.micro_batch_size",
            f"batch_size {cfg.train.batch_size} must be a multiple of micro_batch_size x workers",
        )
    else:
        need(cfg.train.batch_size % world == 0, "train.batch_size",
             f"must be a multiple of cluster.student.workers ({world})")
    _check_ranges(cfg, source)  # issue 12: every number in its range, none NaN / inf
    lo, hi = cfg.teacher.guidance.interval
    need(lo <= hi, "teacher.guidance.interval", f"must be [low, high] with low <= high, got {[lo, hi]}")


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)


__all__ = ["Config", "ConfigError", "load_config", "config_from_dict", "dump_config", "Optional"]
