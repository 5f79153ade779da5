"""Per-rank facts for the trainer program: rank and world size from the environment (set by Ray Train,
torchrun or a test launcher), and the slice of the global batch this rank owns. No ray here.

The global batch is laid out rank-major: rank r owns samples [r * B_local, (r + 1) * B_local). Drawing the
noise of the whole global batch from one seeded generator and slicing it makes a run with W ranks see the
same samples as a run with 1 rank (the equivalence the distributed tests check).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer") from None


def rank_info() -> RankInfo:
    """Rank and world size: from torch.distributed when it is up, else from RANK / WORLD_SIZE / LOCAL_RANK."""
    import torch.distributed as dist

    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        return RankInfo(dist.get_rank(), dist.get_world_size(), local_rank)
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return RankInfo(rank, world, local_rank)


def local_slice(global_batch: int, rank: int, world_size: int) -> slice:
    """The rank-major slice of a global batch that `rank` owns."""
    if global_batch % world_size != 0:
        raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
    n = global_batch // world_size
    return slice(rank * n, (rank + 1) * n)


def global_positions(global_batch: int, rank: int, world_size: int, layout: str = "strided") -> list[int]:
    """Positions in the global batch that `rank` owns: batch[r::W] ("strided") or the r-th chunk."""
    if global_batch % world_size:
        raise ValueError(f"train.batch_size {global_batch} does not split over {world_size} ranks")
    n = global_batch // world_size
    return list(range(rank, global_batch, world_size)) if layout == "strided" else list(range(rank * n, (rank + 1) * n))


def global_noise(shape_per_sample: tuple[int, ...], global_batch: int, seed: int, step: int,
                 info: RankInfo) -> torch.Tensor:
    """This rank's part of the global batch's noise for `step`: the same numbers whatever the world size.

    Returns (B_local, *shape_per_sample) float32. Draws the whole global batch (cheap next to a forward)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    noise = torch.randn((global_batch, *shape_per_sample), generator=g)  # (B_global, ...)
    return noise[local_slice(global_batch, info.rank, info.world_size)].clone()


def device_for(info: RankInfo) -> torch.device:
    if torch.cuda.is_available():
        # the attention kernel follows `model.attention_backend` (models/families/base.py: set_attention_backend)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def collective_device() -> torch.device:
    """Where small tensors of a collective (flags, losses) must live: NCCL only reduces CUDA tensors, gloo CPU
    ones. Found on the first GPU step: a CPU flag tensor under NCCL fails with "No backend type associated with
    device type cpu"."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
