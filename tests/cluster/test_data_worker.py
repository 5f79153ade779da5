"""DataWorker actors produce the same global order, batches and cursor as the in-process PromptStream."""
import pytest
import torch

from cluster.data_worker import DataWorker, DataWorkerPool
from data_pipeline import storage
from data_pipeline.order import Cursor, tasks
from data_pipeline.reader import ReadOptions, ShardReader
from data_pipeline.stream import PromptStream
from tests.data_pipeline.helpers import new_bucket, tar_bytes, write_shards

SIZES = [5, 7, 3, 6, 4]
OPTS = ReadOptions(max_prompt_chars=8, overlong="skip", read_attempts=1, read_backoff_s=0.01, encode_batch_size=3)


class ByteEncoder:
    """A small local encoder: the first 4 UTF-8 bytes of each prompt as floats. (B, 4)"""

    def __call__(self, prompts):
        out = torch.zeros(len(prompts), 4)
        for i, p in enumerate(prompts):
            b = list(p.encode())[:4]
            out[i, : len(b)] = torch.tensor(b, dtype=torch.float32)
        return {"emb": out}


def _dataset(root):
    urls = write_shards(root, SIZES)
    # one shard with bad records (over-long under max 8 chars, empty) and a missing shard in the list
    storage.put_bytes(storage.join(root, "shard-000005.tar"),
                      tar_bytes([("b0", {"txt": b"ok"}), ("b1", {"txt": b"much too long"}), ("b2", {"txt": b""})]))
    return urls + [storage.join(root, "shard-000005.tar"), storage.join(root, "missing.tar")]


def _take(stream, n):
    out = []
    for _ in range(n):
        b = next(stream)
        out.append((b.keys, b.prompts, b.embeddings["emb"] if b.embeddings else None, b.cursor))
    return out


def _same(a, b):
    assert [x[0] for x in a] == [x[0] for x in b]
    assert [x[1] for x in a] == [x[1] for x in b]
    assert [x[3] for x in a] == [x[3] for x in b]
    for x, y in zip(a, b):
        assert (x[2] is None and y[2] is None) or torch.equal(x[2], y[2])


def test_worker_round_robin_matches_reader_without_ray(tmp_path):
    urls = _dataset(str(tmp_path))
    workers = [DataWorker(urls, 3, OPTS, w, 2, prefetch=1) for w in range(2)]
    for w in workers:
        w.start(1, 2, 1)
    reader = ShardReader(urls, 3, OPTS)
    for task, i in zip(tasks(Cursor(1, 2, 1), 3, len(urls), True), range(10)):
        got = workers[i % 2].next_result()
        want = reader.read(task)
        assert got.task == task and got.url == want.url and got.error == want.error
        assert [(p, getattr(r, "key")) for p, r in got.items] == [(p, r.key) for p, r in want.items]
    for w in workers:
        w._halt()


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_two_workers_give_the_prompt_stream_order_and_resume_across(tmp_path, ray_local):
    urls = _dataset(str(tmp_path))
    ref = PromptStream(urls, 4, seed=3, options=OPTS, encoder_factory=ByteEncoder)
    want = _take(ref, 14)  # 29 valid prompts per epoch: 56 samples = two epoch boundaries
    ref.close()

    pool = DataWorkerPool(urls, 4, seed=3, options=OPTS, num_workers=2, prefetch=2, encoder_factory=ByteEncoder)
    try:
        got = _take(pool, 6)
        state = pool.state_dict()
        # resume in-process from the pool's cursor ...
        single = PromptStream(urls, 4, seed=3, options=OPTS, encoder_factory=ByteEncoder)
        single.load_state_dict(state)
        got_single = _take(single, 4)
        # ... and the pool from the in-process cursor, over the epoch boundary
        pool.load_state_dict(single.state_dict())
        single.close()
        got_pool = _take(pool, 4)
        _same(got + got_single + got_pool, want)
        assert pool.stats.bad["overlong"] >= 1 and pool.stats.bad["empty_txt"] >= 1
        assert any("missing.tar" in u for u, _ in pool.stats.skipped_shards)
        assert pool.state_dict() == want[-1][3]
    finally:
        pool.shutdown()


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_workers_read_from_s3(s3_server, ray_local):
    urls = write_shards(new_bucket() + "/w", [6, 6, 6])
    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    ref = PromptStream(urls, 6, seed=1)
    want = [next(ref).keys for _ in range(4)]
    ref.close()
    pool = DataWorkerPool(urls, 6, seed=1, num_workers=2, actor_options={"runtime_env": {"env_vars": env}})
    try:
        assert [next(pool).keys for _ in range(4)] == want
    finally:
        pool.shutdown()


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_batch_feed_serves_rank_slices_and_resumes_with_fewer_ranks(tmp_path, ray_local):
    import functools

    import ray

    from cluster.data_worker import FeedIterator, feed_actor

    urls = _dataset(str(tmp_path))
    ref = PromptStream(urls, 4, seed=3, options=OPTS)
    want = [k for _ in range(12) for k in next(ref).keys]
    ref.close()

    pool = functools.partial(DataWorkerPool, urls, 4, seed=3, options=OPTS, num_workers=2)
    feed = feed_actor(pool)
    ranks = [FeedIterator(feed, r, 2, attempt="a1") for r in range(2)]
    assert ranks[0].state_dict()["batches"] == 0
    got = []
    for _ in range(7):
        a, b = next(ranks[1]).keys, next(ranks[0]).keys  # rank order does not matter
        got += [k for pair in zip(b, a) for k in pair]  # strided: rank 0, rank 1, ...
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()
    ray.get(feed.close.remote())
    ray.kill(feed)

    feed1 = feed_actor(functools.partial(PromptStream, urls, 4, seed=3, options=OPTS))
    one = FeedIterator(feed1, 0, 1)
    one.load_state_dict(state)
    got += [k for _ in range(5) for k in next(one).keys]
    ray.kill(feed1)
    assert got == want
