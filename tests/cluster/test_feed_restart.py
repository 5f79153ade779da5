"""The prompt feed survives restarts (issue 12), on the real prompt-feed path: prompt shards read and
encoded by DataWorker actors (ByteEncoder runs on the workers), cut into global batches by a BatchFeed actor,
sliced for 2 ranks by FeedIterators. Every student-group attempt, fresh or resumed, any number of times from
the same checkpoint, gets exactly the batches an uninterrupted feed hands out from its cursor; a SIGKILLed
feed actor is restarted by Ray and the ranks go on; a hung feed is restarted after `timeout_s`.

Before issue 12 the feed answered "already served" to a fresh restart and to a second restart from the
same checkpoint, and a killed feed actor was gone for good.
"""
from __future__ import annotations

import functools
import os
import signal
import time

import pytest

from cluster.data_worker import DataWorkerPool, FeedIterator, feed_actor
from data_pipeline.stream import PromptStream
from tests.cluster.test_data_worker import OPTS, ByteEncoder
from tests.data_pipeline.helpers import write_shards

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(300)]
SIZES = [5, 7, 3, 6, 4]  # 25 prompts; batches of 4 cross an epoch boundary after 6 steps


def _reference(urls, steps: int):
    ref = PromptStream(urls, 4, seed=3, options=OPTS, encoder_factory=ByteEncoder)
    batches = [next(ref) for _ in range(steps)]
    ref.close()
    return batches


def _step(ranks) -> tuple[list[str], list]:
    """One step of every rank (rank order reversed: it must not matter); the global keys and embeddings."""
    got = [None] * len(ranks)
    for r in reversed(range(len(ranks))):
        got[r] = next(ranks[r])
    keys = [k for group in zip(*(b.keys for b in got)) for k in group]  # strided: rank 0, rank 1, ...
    emb = [row for group in zip(*(b.embeddings["emb"] for b in got)) for row in group]
    return keys, emb


def _attempt(feed, name: str, state=None, **kw):
    ranks = [FeedIterator(feed, r, 2, attempt=name, **kw) for r in range(2)]
    if state is not None:
        for it in ranks:
            it.load_state_dict(state)
    return ranks


def _check(ranks, want, first: int, n: int) -> None:
    for step in range(first, first + n):
        keys, emb = _step(ranks)
        assert keys == want[step].keys, step
        ref = want[step].embeddings["emb"]  # encoded on the DataWorkers exactly as in-process
        assert all((a == b).all() for a, b in zip(emb, ref)), step


def _pid(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def test_every_attempt_rewinds_the_feed_to_its_cursor(tmp_path, ray_local):
    import ray

    urls = write_shards(str(tmp_path), SIZES)
    want = _reference(urls, 12)
    pool = functools.partial(DataWorkerPool, urls, 4, seed=3, options=OPTS, num_workers=2,
                             encoder_factory=ByteEncoder)
    feed = feed_actor(pool, max_restarts=2)
    try:
        a = _attempt(feed, "a")
        _check(a, want, 0, 3)
        checkpoint = a[0].state_dict()  # cursor after step 3 (what a checkpoint of step 3 records)
        _check(a, want, 3, 2)  # ... and the attempt goes on past it before it dies
        # a crash before the first checkpoint: the restarted group starts fresh, from the stream's start
        _check(_attempt(feed, "b"), want, 0, 4)
        # resumed from the checkpoint, three times in a row (each attempt reads a little past it)
        for name in ("c", "d", "e"):
            _check(_attempt(feed, name, checkpoint), want, 3, 3)
        # a rank of a replaced attempt is refused, not served from the new attempt's stream
        with pytest.raises(Exception, match="replaced student-group attempt"):
            next(a[1])

        # the feed actor itself is SIGKILLed mid-attempt, with one rank a step ahead of the other
        f = _attempt(feed, "f", checkpoint)
        _check(f, want, 3, 2)
        next(f[0])  # rank 0 took step 5, rank 1 has not
        pid = _pid(feed)
        os.kill(pid, signal.SIGKILL)
        b5 = next(f[1])  # Ray restarts the feed; rank 1's request rewinds it to rank 1's cursor
        assert b5.keys == want[5].keys[1::2]
        _check(f, want, 6, 4)  # over the epoch boundary
        assert _pid(feed) != pid
    finally:
        ray.get(feed.close.remote())
        ray.kill(feed)


class HangOnce:
    """A PromptStream whose first instance hangs at batch `at` (a marker file says it already did):
    a stuck shard read or encoder, as far as the ranks can tell."""

    def __init__(self, urls, marker: str, at: int):
        self.stream = PromptStream(urls, 4, seed=3, options=OPTS, encoder_factory=ByteEncoder)
        self.marker, self.at = marker, at

    def __next__(self):
        if self.stream.state_dict()["batches"] == self.at and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(3600)
        return next(self.stream)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def test_a_hung_feed_is_restarted_and_the_request_retried(tmp_path, ray_local):
    import ray

    urls = write_shards(str(tmp_path), SIZES)
    want = _reference(urls, 6)
    marker = str(tmp_path / "hung")
    feed = feed_actor(functools.partial(HangOnce, urls, marker, 2), max_restarts=1)
    try:
        ranks = _attempt(feed, "a", timeout_s=5.0, retries=1)
        pid = _pid(feed)
        _check(ranks, want, 0, 5)  # step 2 hangs; after 5 s the feed is killed, restarted and asked again
        assert os.path.exists(marker) and _pid(feed) != pid
    finally:
        ray.kill(feed)
