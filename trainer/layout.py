"""Where a run's weights live (issue 23, docs/performance.md): the layout every rank of a DeepSpeed run takes
(`train.frozen_weights`, `train.trainable_comm`, `train.prefetch_blocks`, resolved by the memory plan when
`auto`) and the node shape and process groups it needs. torch.distributed only; trainer/engine.py applies it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainer.config import Config

DEFAULT_PREFETCH_NUMEL = 50_000_000  # DeepSpeed's own default, used when the model is not planned


@dataclass(frozen=True)
class Layout:
    """This run's weight layout: `frozen` (replicate | shard_in_node | shard) places a LoRA run's frozen base,
    `trainable` (per_step | per_pass) the trainables' communication, `gpus_per_node` the node shape and
    `prefetch_numel` ZeRO-3's prefetch bucket (`train.prefetch_blocks` blocks of the planned model)."""

    frozen: str
    trainable: str
    gpus_per_node: int
    prefetch_numel: int


_LAYOUTS: dict[tuple[str, int], Layout] = {}
_NODE_GROUPS: dict[tuple[int, ...], Any] = {}


def node_shape(cfg: Config, world: int) -> tuple[int, int]:
    """(this rank's node index, GPUs per node): NODE_RANK / LOCAL_WORLD_SIZE as Ray Train and torchrun set them,
    else `cluster.gpus_per_node`, else one node holding every rank."""
    import os

    from trainer.distributed import rank_info

    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    per_node = max(1, min(int(local) if local else (cfg.cluster.gpus_per_node or world), world))
    node = os.environ.get("NODE_RANK", "")
    return (int(node) if node else rank_info().rank // per_node), per_node


def _gpu_memory_gib(cfg: Config) -> float | None:
    """Memory per GPU for the plan: `cluster.gpu_memory_gb`, else the CUDA device's; None on CPU ranks."""
    if cfg.cluster.gpu_memory_gb > 0:
        return cfg.cluster.gpu_memory_gb * 1e9 / 2**30
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    return None


def engine_layout(cfg: Config) -> Layout:
    """Resolve `train.frozen_weights` / `train.trainable_comm` for this process group (collective on first use).

    Rank 0 plans the model (`trainer.planner.memory.runtime_layout`: `auto` takes the first layout that fits the GPU)
    and broadcasts its choice, so every rank takes the same one even where their devices differ."""
    import torch.distributed as dist

    from trainer.distributed import collective_device
    from trainer.planner.memory import FROZEN_PLACEMENTS, TRAINABLE_COMM, runtime_layout

    world = dist.get_world_size() if dist.is_initialized() else 1
    key = (cfg.hash(), world)
    if key not in _LAYOUTS:
        _, per_node = node_shape(cfg, world)
        choice = torch.zeros(3, dtype=torch.long, device=collective_device())
        failure = None
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                row, largest_block = runtime_layout(cfg, world, per_node, _gpu_memory_gib(cfg))
                choice[0] = FROZEN_PLACEMENTS.index(row.frozen)
                choice[1] = TRAINABLE_COMM.index(row.trainable)
                choice[2] = round(cfg.train.prefetch_blocks * (largest_block or DEFAULT_PREFETCH_NUMEL))
            except Exception as e:  # the other ranks wait in the broadcast: tell them, then fail everywhere
                failure, choice[0] = e, -1
        if dist.is_initialized():
            dist.broadcast(choice, 0)
        if failure is not None:
            raise failure
        f, t, prefetch = (int(v) for v in choice.tolist())
        if f < 0:
            raise RuntimeError("planning the weight layout failed on rank 0 (its error names the cause)")
        _LAYOUTS[key] = Layout(FROZEN_PLACEMENTS[f], TRAINABLE_COMM[t], per_node, prefetch)
    return _LAYOUTS[key]


def node_group(cfg: Config) -> Any:
    """The process group of this rank's node (`shard_in_node`); None when one node holds every rank. Every rank
    builds every node's group, in the same order (torch.distributed.new_group is collective)."""
    import torch.distributed as dist

    from trainer.distributed import collective_device

    world = dist.get_world_size()
    node, _ = node_shape(cfg, world)
    nodes = torch.zeros(world, dtype=torch.long, device=collective_device())
    mine = torch.tensor([node], dtype=torch.long, device=collective_device())
    dist.all_gather_into_tensor(nodes, mine)
    nodes = tuple(int(n) for n in nodes.tolist())
    if len(set(nodes)) == 1:
        return None
    if nodes not in _NODE_GROUPS:
        groups = {n: dist.new_group([r for r, m in enumerate(nodes) if m == n]) for n in sorted(set(nodes))}
        _NODE_GROUPS[nodes] = groups
    return _NODE_GROUPS[nodes][node]
