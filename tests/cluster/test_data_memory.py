"""The prompt feed at real embedding sizes (issue 22), on real Ray actors:

- backpressure: a DataWorker whose consumer stalls holds its read-ahead under `data.max_memory_gb` and waits
  (its process memory, measured from outside, stays bounded), where a worker bounded in pieces only (whole
  shards, as the shard-counting reader was) holds 8 shards; the stream then goes on without a sample lost;
- compact to the rank: pre-encoded fp8 (+ scale) and bf16 embeddings reach each rank's `FeedIterator` in their
  stored dtype, fetched from the DataWorkers' object store (not through the feed), about their stored bytes per
  sample, and `OnDevice` turns them into the compute dtype with the values the float32 reader gave;
- a DataWorker killed while the feed holds batches whose embeddings it owns: the ranks get them again, exact.
"""
from __future__ import annotations

import functools
import os
import signal
import time

import pytest
import torch

from cluster.data_worker import DataWorker, DataWorkerPool, FeedIterator, feed_actor
from data_pipeline import storage
from data_pipeline.encoding.packing import from_bytes, to_bytes
from data_pipeline.reader import ReadOptions
from data_pipeline.stream import PromptStream
from tests.data_pipeline.helpers import tar_bytes

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
PRE = ReadOptions(pre_encoded=True, read_attempts=2, read_backoff_s=0.01)


def _flux_like(i: int, dtype: str, rows: int = 16, width: int = 64) -> bytes:
    """A FLUX-shaped sample (T5 sequence without a mask, pooled CLIP), reduced."""
    g = torch.Generator().manual_seed(i)
    return to_bytes({"prompt_embeds": torch.randn(rows, width, generator=g),
                     "pooled_prompt_embeds": torch.randn(width // 2, generator=g)}, dtype)


def _write(root: str, sizes: list[int], dtype: str, **kw) -> tuple[list[str], dict[str, bytes]]:
    urls, raws, i = [], {}, 0
    for s, n in enumerate(sizes):
        samples = []
        for _ in range(n):
            key = f"e{i:05d}"
            raws[key] = _flux_like(i, dtype, **kw)
            samples.append((key, {"txt": f"prompt {i}".encode(), "emb.safetensors": raws[key]}))
            i += 1
        urls.append(storage.join(root, f"shard-{s:06d}.tar"))
        storage.put_bytes(urls[-1], tar_bytes(samples))
    return urls, raws


def _pid(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def _rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def _wait(cond, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_worker_holds_back_while_its_consumer_stalls(tmp_path, ray_local):
    import ray

    # 8 shards x 40 samples x 512 KiB (bf16 256 x 1024): 160 MiB in all
    urls, _ = _write(str(tmp_path), [40] * 8, "bf16", rows=256, width=1024)
    total = 320
    ref = PromptStream(urls, 4, seed=2, options=PRE)
    want = [next(ref).keys for _ in range(total // 4)]
    ref.close()
    probe = ray.remote(num_cpus=0)(DataWorker).remote(urls, 2, PRE, 0, 1)
    baseline = ray.get(probe.__ray_call__.remote(lambda self: __import__("data_pipeline.readahead").readahead
                                                 .process_memory()[1]))
    ray.kill(probe)
    cap_mb = 16
    pools = {"bounded": DataWorkerPool(urls, 4, seed=2, options=PRE, num_workers=1, prefetch=1000,
                                       actor_options={"num_cpus": 0},
                                       max_memory_gb=(baseline + cap_mb * 2**20) / 2**30),
             # bounded in pieces only (a whole 40-sample shard each), as the shard-counting reader was
             "free": DataWorkerPool(urls, 4, seed=2, options=PRE, num_workers=1, prefetch=8,
                                    actor_options={"num_cpus": 0}, max_memory_gb=16.0)}
    try:
        pids = {name: _pid(p.workers[0]) for name, p in pools.items()}
        idle = {name: _rss(pid) for name, pid in pids.items()}
        got = {name: [next(p).keys] for name, p in pools.items()}  # both reading; now the consumer stalls
        grown, stats = {}, {}
        for name, pool in pools.items():
            worker = pool.workers[0]
            read = lambda: ray.get(worker.stats.remote())  # noqa: E731
            _wait(lambda: read()["held_s"] > 2.0)
            time.sleep(1.0)
            stats[name], grown[name] = read(), (_rss(pids[name]) - idle[name]) / 2**20
        b, f = stats["bounded"], stats["free"]
        # the bounded worker waits with its read-ahead under its cap; the unbounded one read everything ahead
        assert b["held_s"] > 2.0 and b["read_samples"] < total / 2
        assert b["readahead_mb"] <= b["readahead_cap_mb"] + 0.5 and b["readahead_cap_mb"] <= cap_mb + 4
        assert f["readahead_mb"] > 140  # 8 shards' worth
        # measured from outside: the process grew by about its cap (+ two pieces in flight to the pool, the
        # reader's buffers and imports), not by the data it could read ahead
        assert grown["bounded"] < cap_mb + 32 and grown["free"] > 120, grown
        # the stall cost nothing: the stream goes on in the same order
        for name, pool in pools.items():
            got[name] += [next(pool).keys for _ in range(total // 4 - 1)]
            assert got[name] == want, name
    finally:
        for pool in pools.values():
            pool.shutdown()


def _ranks(feed, world: int = 2):
    return [FeedIterator(feed, r, world, attempt="a") for r in range(world)]


class Spy(FeedIterator):
    """A rank's iterator that also records what the feed sent it: Ray's serialized size, and the handles."""

    def _call(self, method, *args):
        import ray

        out = super()._call(method, *args)
        if method == "get":
            ctx = ray._private.worker.global_worker.get_serialization_context()
            self.sent = (ctx.serialize(out).total_bytes, out.embeddings, list(out.payloads or []))
        return out


@pytest.mark.parametrize("dtype,stored", [("fp8", torch.float8_e4m3fn), ("bf16", torch.bfloat16)])
def test_embeddings_reach_the_rank_in_their_stored_dtype(tmp_path, ray_local, dtype, stored):
    import ray

    from trainer.config import config_from_dict
    from trainer.distributed import RankInfo
    from trainer.rank_program import OnDevice, PromptBatches

    urls, raws = _write(str(tmp_path), [7, 5, 6], dtype, rows=64, width=256)
    feed = feed_actor(functools.partial(DataWorkerPool, urls, 4, seed=1, options=PRE, num_workers=2))
    try:
        ranks = [Spy(feed, r, 2, attempt="a") for r in range(2)]
        cfg = config_from_dict({"run": {"seed": 1}, "train": {"batch_size": 4}, "model": {"dtype": "bfloat16"},
                                "cluster": {"student": {"workers": 2}}})
        ctx = ray._private.worker.global_worker.get_serialization_context()
        moved = stored_bytes = 0
        for step in range(5):
            for r, it in enumerate(ranks):
                batch = next(it)  # the feed's slice, then its embeddings fetched from the workers
                size, embeddings, handles = it.sent
                assert embeddings is None and len(handles) == 2  # the feed sent handles, no embedding bytes
                moved += size
                e = batch.embeddings.entries
                assert e["prompt_embeds"].data.dtype == stored and e["pooled_prompt_embeds"].data.dtype == stored
                assert (e["prompt_embeds"].scale is not None) == (dtype == "fp8")
                moved += sum(ctx.serialize(raw).total_bytes for raw in ray.get(handles))
                stored_bytes += sum(len(raws[k]) + len(f"prompt {int(k[1:])}") for k in batch.keys)
                # on the rank's device, in the compute dtype: the float32 reader's values, cast
                pb = PromptBatches(cfg, iter([batch]), RankInfo(r, 2, 0), (2, 4, 4))
                _, cond = next(OnDevice(pb, torch.device("cpu"), torch.bfloat16))
                for name in ("prompt_embeds", "pooled_prompt_embeds"):
                    ref = torch.stack([from_bytes(raws[k])[name] for k in batch.keys]).to(torch.bfloat16)
                    assert cond[name].dtype == torch.bfloat16 and torch.equal(cond[name], ref), name
        # through Ray per sample: its stored bytes once (worker -> rank) and a few hundred bytes of handles
        assert moved / stored_bytes <= 1.1, moved / stored_bytes
    finally:
        ray.get(feed.close.remote())
        ray.kill(feed)


def test_a_killed_worker_loses_no_embeddings(tmp_path, ray_local):
    import ray

    urls, raws = _write(str(tmp_path), [5, 7, 3, 6, 4, 5], "fp8")
    ref = PromptStream(urls, 4, seed=5, options=PRE)
    want = [next(ref) for _ in range(10)]
    ref.close()
    pool = functools.partial(DataWorkerPool, urls, 4, seed=5, options=PRE, num_workers=2, prefetch=2)
    feed = feed_actor(pool)
    try:
        ranks = _ranks(feed)
        for step in range(10):
            if step == 3:
                # rank 0 takes step 3 (its worker's handles cached for rank 1), then that worker dies
                got0 = next(ranks[0])
                workers = ray.get(feed.__ray_call__.remote(lambda self: self.stream.workers))
                for w in workers:
                    os.kill(_pid(w), signal.SIGKILL)
                got = [got0, next(ranks[1])]
            else:
                got = [next(it) for it in ranks]
            keys = [k for pair in zip(*(b.keys for b in got)) for k in pair]
            assert keys == want[step].keys, step
            for b in got:
                assert b.embeddings.entries["prompt_embeds"].data.dtype == torch.float8_e4m3fn  # still as stored
                for j, k in enumerate(b.keys):
                    assert torch.equal(b.embeddings["prompt_embeds"][j], from_bytes(raws[k])["prompt_embeds"]), k
    finally:
        ray.get(feed.close.remote())
        ray.kill(feed)
