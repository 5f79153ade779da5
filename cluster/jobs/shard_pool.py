"""Run one unit of work per shard over a pool of Ray actors, resumably.

Each actor builds its worker ONCE (`factory()`: e.g. loads the text encoders or the VAE, on the actor's GPU
when it has one) and then processes shard after shard: `worker(src_url, out_url) -> {"samples": n, ...}`.
A worker writes its output shard in one atomic put (storage.put_bytes), so an output shard either exists
whole or not at all: a killed job leaves only finished shards, and a rerun skips them (checked here before
any work, and again by the worker). The driver shows a progress bar over samples with an ETA (the total is
estimated from the finished shards' mean until every shard is done).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from data_pipeline import storage


@dataclass
class PoolReport:
    done: list[dict[str, Any]] = field(default_factory=list)  # per processed shard: the worker's summary
    skipped: list[str] = field(default_factory=list)  # output shards that existed already (a resumed job)
    seconds: float = 0.0

    @property
    def samples(self) -> int:
        return sum(int(d.get("samples", 0)) for d in self.done)


class ShardWorker:
    """The actor body: the worker is built once, in the actor's process."""

    def __init__(self, factory: Callable[[], Callable[[str, str], dict]]):
        self.worker = factory()

    def run(self, src: str, out: str) -> dict[str, Any]:
        import os

        if storage.exists(out):  # finished meanwhile (another job on the same output)
            return {"src": src, "out": out, "samples": 0, "skipped": True, "pid": os.getpid()}
        return {"src": src, "out": out, "pid": os.getpid(), **self.worker(src, out)}


def pending_tasks(tasks: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[str]]:
    """Split (src, out) pairs into the ones still to do and the outputs that exist already."""
    todo, done = [], []
    for src, out in tasks:
        (done.append(out) if storage.exists(out) else todo.append((src, out)))
    return todo, done


def run_shard_pool(tasks: list[tuple[str, str]], factory: Callable[[], Callable[[str, str], dict]], workers: int,
                   cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, desc: str = "shards",
                   unit: str = "sample", progress: bool = True, on_result: Optional[Callable[[dict], None]] = None
                   ) -> PoolReport:
    """Process every (src, out) pair whose output does not exist yet on `workers` actors (Ray must be
    initialised by the caller: `cluster.orchestrator.connect`)."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    report = PoolReport()
    todo, report.skipped = pending_tasks(tasks)
    if report.skipped:
        print(f"{desc}: {len(report.skipped)} of {len(tasks)} output shards exist already (skipped: resumed job)",
              file=sys.stderr)
    if not todo:
        report.seconds = time.perf_counter() - t0
        return report
    actor_cls = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(ShardWorker)
    actors = [actor_cls.remote(factory) for _ in range(min(workers, len(todo)))]
    bar = tqdm(total=None, desc=desc, unit=unit, disable=not progress, mininterval=1.0, file=sys.stderr)
    try:
        pool = ActorPool(actors)
        for result in pool.map_unordered(lambda actor, task: actor.run.remote(*task), todo):
            report.done.append(result)
            if on_result is not None:
                on_result(result)
            n = int(result.get("samples", 0))
            finished = len(report.done)
            # ETA: the mean samples per finished shard times the shards still to do
            bar.total = report.samples + round(report.samples / finished * (len(todo) - finished))
            bar.update(n)
            bar.set_postfix(shards=f"{finished}/{len(todo)}", refresh=False)
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)
    report.seconds = time.perf_counter() - t0
    return report
