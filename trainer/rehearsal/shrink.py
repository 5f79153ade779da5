"""The shrink of a production recipe for a rehearsal (`piflow rehearse`, docs/rehearse.md).

A rehearsal runs the recipe exactly as written except for the keys of `SHRINK`, one fixed table: each row
names the keys it changes, what kind of shrink it is and the rule, and computes the rehearsal value. The docs
print this table and the tests read it; a recipe whose rehearsal differs in any other key fails the suite.
Everything else (engine, precision, gradient checkpointing, placement, guidance, LoRA, optimizer, EMA,
pre-encoded shard formats, evaluation, policy and distillation settings) stays as the recipe says.

The weights are not a config key: `model.pretrained` keeps its hub id and resolves, through the real loader
(trainer/weights.py), into a temporary hub cache that holds a tiny model of the same family
(trainer/rehearsal/snapshot.py: the depth and width part of the shrink).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainer.config import Config, ConfigError, load_config

REHEARSAL_FAMILIES = ("flux", "qwen_image", "dit", "wan")
# resolution and sequence length on the small machine (latent units; 2x2 patches: 16 image tokens per frame)
LATENT_SIZE = 8
VIDEO_LATENT = {"latent_size": 4, "latent_width": 8, "latent_frames": 3}  # non-square, 3 frames: 24 tokens
MAX_SEQUENCE = 16
MIN_STEPS = 4
RANKS = 2  # the rehearsal trains on 2 ranks (ZeRO-3 partitions, a rank to kill and a group to restart)


@dataclass(frozen=True)
class Machine:
    """What the rehearsal runs on (detected by `here()`; fixed in tests)."""

    cpus: int
    gpus: int = 0
    memory_gb: float = 0.0
    gpu_memory_gb: float = 0.0

    @classmethod
    def here(cls) -> "Machine":
        import torch

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpu_mem = torch.cuda.get_device_properties(0).total_memory / 2**30 if gpus else 0.0
        mem = 0.0
        try:
            with open("/proc/meminfo") as f:
                mem = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) / 2**20
        except (OSError, StopIteration, ValueError):
            pass
        return cls(cpus=cpus, gpus=gpus, memory_gb=math.floor(mem), gpu_memory_gb=math.floor(gpu_mem))

    @property
    def workers(self) -> int:
        """Student ranks: 2 on CPUs (gloo) or on >= 2 GPUs; 1 on a single GPU (NCCL wants one rank per GPU)."""
        return 1 if self.gpus == 1 else RANKS


@dataclass(frozen=True)
class Context:
    """What a rehearsal supplies: its machine, step count, output URL, shard URL and, for a recipe whose
    model.pretrained is a local directory, the tiny model's directory."""

    machine: Machine
    steps: int
    output: str
    shards: str = ""
    pretrained_dir: str = ""


@dataclass(frozen=True)
class Rule:
    key: str
    kind: str  # what is shrunk (the categories of docs/rehearse.md)
    rule: str  # the rehearsal value in words
    value: Callable[[Config, Context], Any] = field(repr=False)


def _per_rank(cfg: Config) -> int:
    """Samples per rank: 1, or 2 when the recipe accumulates micro-batches (so the rehearsal accumulates too)."""
    micro, world = cfg.train.micro_batch_size, cfg.cluster.student.workers
    return 2 if micro and micro * world < cfg.train.batch_size else 1


def _pretrained(cfg: Config, ctx: Context) -> str:
    from trainer.weights import is_hub_id

    ref = cfg.model.pretrained
    if is_hub_id(ref):
        return ref  # the hub id stays; the tiny snapshot sits in the rehearsal's HF_HUB_CACHE
    if not ctx.pretrained_dir:
        raise ConfigError(f"model.pretrained={ref!r} is a directory: the rehearsal needs the tiny model's dir")
    return ctx.pretrained_dir


def _video(key: str):
    def value(cfg: Config, ctx: Context) -> Any:
        if cfg.model.latent_frames > 1:
            return VIDEO_LATENT[key]
        return {"latent_size": LATENT_SIZE, "latent_width": 0, "latent_frames": 1}[key]
    return value


def _teacher_gpus(cfg: Config, ctx: Context) -> float:
    m = ctx.machine
    return 1.0 if m.gpus > m.workers else 0.0  # a GPU of its own only when one is left after the student ranks


SHRINK: tuple[Rule, ...] = (
    # -- weights: the hub id stays (a tiny same-family snapshot in a temporary HF_HUB_CACHE, HF_HUB_OFFLINE=1)
    Rule("model.pretrained", "weights", "hub id unchanged (tiny same-family snapshot in a temporary hub cache); "
         "a local directory becomes the tiny model's directory", _pretrained),
    # -- resolution and sequence length
    Rule("model.latent_size", "resolution", f"{LATENT_SIZE} (video: {VIDEO_LATENT['latent_size']})",
         _video("latent_size")),
    Rule("model.latent_width", "resolution", f"as latent_size (video: {VIDEO_LATENT['latent_width']})",
         _video("latent_width")),
    Rule("model.latent_frames", "sequence length", f"1 (video: {VIDEO_LATENT['latent_frames']})",
         _video("latent_frames")),
    Rule("model.max_sequence_length", "sequence length", f"min(recipe, {MAX_SEQUENCE}) text tokens",
         lambda cfg, ctx: min(cfg.model.max_sequence_length, MAX_SEQUENCE)),
    # -- batch
    Rule("train.batch_size", "batch size", "ranks x 1 (x 2 when the recipe accumulates micro-batches)",
         lambda cfg, ctx: ctx.machine.workers * _per_rank(cfg)),
    Rule("train.micro_batch_size", "batch size", "1 when the recipe sets one, else 0",
         lambda cfg, ctx: 1 if cfg.train.micro_batch_size else 0),
    # -- workers, GPUs and CPUs to fit the machine
    Rule("cluster.address", "machine", "local (an in-process Ray)", lambda cfg, ctx: "local"),
    Rule("cluster.num_cpus", "machine", "the machine's CPUs", lambda cfg, ctx: ctx.machine.cpus),
    Rule("cluster.nodes", "machine", "1", lambda cfg, ctx: 1),
    Rule("cluster.gpus_per_node", "machine", "the machine's GPUs", lambda cfg, ctx: ctx.machine.gpus),
    Rule("cluster.cpus_per_node", "machine", "the machine's CPUs", lambda cfg, ctx: ctx.machine.cpus),
    Rule("cluster.memory_gb_per_node", "machine", "the machine's memory (GB)", lambda cfg, ctx: ctx.machine.memory_gb),
    Rule("cluster.gpu_memory_gb", "machine", "the machine's GPU memory (0 without one)",
         lambda cfg, ctx: ctx.machine.gpu_memory_gb),
    Rule("cluster.student.workers", "workers", f"{RANKS} (1 on a single GPU)", lambda cfg, ctx: ctx.machine.workers),
    Rule("cluster.student.gpus_per_worker", "GPUs per worker", "1 on a GPU machine, else 0",
         lambda cfg, ctx: 1.0 if ctx.machine.gpus else 0.0),
    Rule("cluster.student.cpus_per_worker", "workers", "the machine's CPUs / ranks (at least 1, at most the recipe's)",
         lambda cfg, ctx: min(cfg.cluster.student.cpus_per_worker, max(1.0, ctx.machine.cpus // ctx.machine.workers))),
    Rule("cluster.data_cpus_per_worker", "workers", "0 (the data workers share the driver's CPUs)",
         lambda cfg, ctx: 0.0),
    Rule("teacher.replicas", "workers", "1", lambda cfg, ctx: 1),
    Rule("teacher.gpus_per_replica", "GPUs per worker", "1 when a GPU is left after the student ranks, else 0",
         _teacher_gpus),
    Rule("teacher.cpus_per_replica", "workers", "0 (the CPUs go to the student ranks)", lambda cfg, ctx: 0.0),
    Rule("data.workers", "workers", "1", lambda cfg, ctx: 1),
    # -- iterations and cadences
    Rule("train.iters", "iterations", "--steps (default 6; the suite: 4)", lambda cfg, ctx: ctx.steps),
    Rule("train.ckpt_every", "checkpoint cadence", "steps / 2 (a rank is killed in the step after it)",
         lambda cfg, ctx: max(1, ctx.steps // 2)),
    Rule("run.log_flush_steps", "checkpoint cadence", "1 (every step's record reaches storage before the kill)",
         lambda cfg, ctx: 1),
    # -- where things go
    Rule("run.output", "output", "--output, or a temporary local S3 server (moto on 127.0.0.1)",
         lambda cfg, ctx: ctx.output),
    Rule("data.shards", "data", "the rehearsal's own shards, built and encoded with `piflow shards`",
         lambda cfg, ctx: ctx.shards or cfg.data.shards),
    Rule("wandb.mode", "wandb", "offline (disabled stays disabled)",
         lambda cfg, ctx: "disabled" if cfg.wandb.mode == "disabled" else "offline"),
)
SHRINK_KEYS = frozenset(r.key for r in SHRINK)


@dataclass(frozen=True)
class Change:
    key: str
    recipe: Any
    rehearsal: Any
    kind: str  # the shrink kind, or "override" (the user's own key=value)


def _format(value: Any) -> str:
    return str(value) if not isinstance(value, str) else (value or "''")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(recipe: Config, rehearsal: Config) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs: key -> (recipe value, rehearsal value)."""
    a, b = flatten(recipe.to_dict()), flatten(rehearsal.to_dict())
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def shrink_overrides(cfg: Config, ctx: Context) -> list[str]:
    """The shrink as `key=value` overrides of the recipe (what `piflow rehearse` applies, and prints)."""
    if cfg.model.family not in REHEARSAL_FAMILIES:
        raise ConfigError(f"model.family={cfg.model.family!r}: `piflow rehearse` has tiny models of "
                          f"{', '.join(REHEARSAL_FAMILIES)}")
    if ctx.steps < MIN_STEPS:
        raise ConfigError(f"--steps {ctx.steps}: a rehearsal needs at least {MIN_STEPS} (a checkpoint at steps / 2, "
                          f"the step after it, where a rank is killed, and the resumed steps)")
    out = []
    for rule in SHRINK:
        value = rule.value(cfg, ctx)
        out.append(f"{rule.key}={_yaml(value)}")
    return out


def _yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def shrink(recipe: str | Path, ctx: Context, overrides: list[str] | tuple[str, ...] = ()
           ) -> tuple[Config, Config, list[Change]]:
    """(the recipe as written, its rehearsal config, every changed key). `overrides` (the user's own
    `key=value`) apply on top of the shrink and are listed as kind "override"."""
    recipe_cfg = load_config(recipe)
    shrunk = load_config(recipe, shrink_overrides(recipe_cfg, ctx))
    final = load_config(recipe, [*shrink_overrides(recipe_cfg, ctx), *overrides]) if overrides else shrunk
    kinds = {r.key: r.kind for r in SHRINK}
    own = differences(shrunk, final)
    changes = [Change(k, a, b, "override" if k in own else kinds.get(k, "?"))
               for k, (a, b) in differences(recipe_cfg, final).items()]
    # a model.pretrained hub id is not a changed key, but its weights are: name them in the table
    if not any(c.key == "model.pretrained" for c in changes):
        changes.append(Change("model.pretrained", recipe_cfg.model.pretrained,
                              f"{recipe_cfg.model.pretrained} (tiny same-family snapshot)", "weights"))
    order = {r.key: i for i, r in enumerate(SHRINK)}
    changes.sort(key=lambda c: (c.kind == "override", order.get(c.key, len(order)), c.key))
    return recipe_cfg, final, changes


def table_markdown() -> str:
    """The shrink table as Markdown (docs/rehearse.md holds this text; a test keeps them equal)."""
    lines = ["| key | shrunk | rehearsal value |", "| --- | --- | --- |"]
    lines += [f"| `{r.key}` | {r.kind} | {r.rule} |" for r in SHRINK]
    return "\n".join(lines)


def format_change(c: Change) -> tuple[str, str]:
    return c.key, f"{_format(c.recipe)} -> {_format(c.rehearsal)}"


__all__ = ["Machine", "Context", "Rule", "SHRINK", "SHRINK_KEYS", "Change", "shrink", "shrink_overrides",
           "differences", "table_markdown", "REHEARSAL_FAMILIES"]
