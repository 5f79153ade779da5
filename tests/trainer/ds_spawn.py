"""Launch N local ranks of a function over gloo (the multi-process harness of the distributed tests).

Each rank is a fresh `spawn` process with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, the way Ray
Train or torchrun would set them; the function's return value comes back through a queue.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, queue, accelerator: str = "cpu") -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR=accelerator,
                      OMP_NUM_THREADS="1")
    if accelerator == "cpu":  # a CPU rank even where a GPU is present (the gpu tier's CPU references)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        import torch

        torch.set_num_threads(1)
        result = fn(*args)
        queue.put((rank, "ok", result))
    except BaseException:  # report any failure to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0, accelerator: str = "cpu") -> list[Any]:
    """Run `fn(*args)` on `world_size` ranks; returns the per-rank results (index = rank). `accelerator`:
    DeepSpeed's (`cpu` over gloo; `cuda` for the gpu tier, over nccl)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, accelerator)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
