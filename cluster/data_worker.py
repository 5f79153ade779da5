"""Ray DataWorker actors that read, validate and encode prompt shards, and the driver-side pool that merges
their output into the deterministic global order (DESIGN.md §1, §5).

Shard visits are numbered from the start cursor (`data_pipeline.order.tasks`); worker w of W takes visits
w, w+W, w+2W, ... and runs `ShardReader.read` on each, exactly what the in-process `PromptStream` runs, on a
background thread that keeps at most `prefetch` finished shards queued (bounded memory). The pool asks the
workers for visits in round-robin order, so `GlobalBatchStream` cuts the same batches from the same records
as `PromptStream`: the order and the cursor do not depend on the number of workers either.

The trainer receives `DataWorkerPool` (or a `RankBatches` over it) as a plain iterator with
`state_dict()` / `load_state_dict()`; it never imports ray.
"""
from __future__ import annotations

import collections
import queue
import threading
from typing import Any, Iterator, Optional

from data_pipeline.order import Cursor, tasks
from data_pipeline.reader import EncoderFactory, ReadOptions, ShardReader, ShardResult
from data_pipeline.stream import GlobalBatchStream


class _Failure:
    """An exception from the worker's read thread, handed to the driver at the visit where it happened."""

    def __init__(self, exc: BaseException):
        import traceback

        self.text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


class DataWorker:
    """Reads this worker's share of shard visits ahead on a thread (a plain class; the pool wraps it in Ray)."""

    def __init__(self, shards: list[str], seed: int, options: ReadOptions, worker_index: int, num_workers: int,
                 prefetch: int = 2, encoder_factory: Optional[EncoderFactory] = None):
        # The encoder is built here, on the worker (its GPU in production), on the first shard it reads.
        self.reader = ShardReader(shards, seed, options, encoder_factory)
        self.worker_index, self.num_workers = worker_index, num_workers
        self.prefetch = max(1, prefetch)
        self._queue: queue.Queue = queue.Queue(self.prefetch)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self, epoch: int, shard_pos: int, sample_pos: int, first_visit: int = 0) -> int:
        """(Re)start reading from a cursor; results of an earlier start are dropped. `first_visit` skips the
        visits (numbered from the cursor) before it: a restarted actor resumes where the pool is (issue 7)."""
        self._halt()
        self._stop = threading.Event()
        self._queue = queue.Queue(self.prefetch)
        r = self.reader
        todo = tasks(Cursor(epoch, shard_pos, sample_pos), r.seed, len(r.shards), r.options.shuffle_shards)
        self._thread = threading.Thread(target=self._run, args=(todo, self._queue, self._stop, first_visit),
                                        name=f"data-worker-{self.worker_index}", daemon=True)
        self._thread.start()
        return self.worker_index

    def _run(self, todo: Iterator, out: queue.Queue, stop: threading.Event, first_visit: int = 0) -> None:
        for task in todo:
            if task.index % self.num_workers != self.worker_index or task.index < first_visit:
                continue
            try:
                item: Any = self.reader.read(task)
            except BaseException as e:  # noqa: BLE001 - surfaced on the driver by next_result
                item = _Failure(e)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set() or isinstance(item, _Failure):
                return

    def next_result(self) -> ShardResult:
        """The next shard visit assigned to this worker (blocks while it is being read)."""
        if self._thread is None:
            raise RuntimeError("DataWorker.next_result before start()")
        while True:
            try:
                item = self._queue.get(timeout=0.5)
                break
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError(f"data worker {self.worker_index}: reader thread stopped") from None
        if isinstance(item, _Failure):
            raise RuntimeError(f"data worker {self.worker_index} failed:\n{item.text}")
        return item

    def queued(self) -> int:
        return self._queue.qsize()

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=30)
            self._thread = None


class DataWorkerPool(GlobalBatchStream):
    """`num_workers` DataWorker actors feeding global batches in the same order as `PromptStream`.

    `actor_options` go to `ray.remote(...).options(...)` (e.g. num_cpus, num_gpus, a placement-group
    scheduling strategy, `runtime_env` with NON-secret settings such as PIFLOW_S3_ENDPOINT; credentials
    come from each node's environment or the AWS chain).
    """

    MAX_RESTARTS = 3  # per worker actor: process deaths survived before the stream fails (issue 7)

    def __init__(self, shards: list[str] | str, batch_size: int, seed: int = 0,
                 options: Optional[ReadOptions] = None, num_workers: int = 1, prefetch: int = 2,
                 encoder_factory: Optional[EncoderFactory] = None, actor_options: Optional[dict[str, Any]] = None):
        import ray

        from data_pipeline.shards import resolve_shards

        super().__init__(resolve_shards(shards), batch_size, seed, options or ReadOptions())
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        # max_restarts (issue 7): Ray restarts a dead worker process; `_result` restarts its reading at the lost visit
        opts = {"num_cpus": 1, "max_restarts": self.MAX_RESTARTS, **(actor_options or {})}
        actor = ray.remote(DataWorker).options(**opts)
        self.workers = [actor.remote(self.shards, seed, self.options, w, num_workers, prefetch, encoder_factory)
                        for w in range(num_workers)]

    def _results(self, start: Cursor) -> Iterator[ShardResult]:
        import ray

        ray.get([w.start.remote(start.epoch, start.shard_pos, start.sample_pos) for w in self.workers])
        n = len(self.workers)
        window: collections.deque = collections.deque()  # (visit, ref)
        visit = 0
        while True:
            while len(window) < n:  # one request in flight per worker; each worker reads ahead on its own
                window.append((visit, self.workers[visit % n].next_result.remote()))
                visit += 1
            yield self._result(*window.popleft(), start)

    def _result(self, visit: int, ref: Any, start: Cursor) -> ShardResult:
        """The result of shard visit `visit`. If its worker died (issue 7), Ray restarts the actor (its
        max_restarts) and the worker starts reading again AT this visit: the stream has consumed exactly the
        visits before it, and the worker's lost read-ahead is re-read, so no sample is lost or repeated."""
        import ray
        from ray.exceptions import RayActorError

        worker = self.workers[visit % len(self.workers)]
        for attempt in range(self.MAX_RESTARTS + 1):
            try:
                return ray.get(ref)
            except RayActorError as e:
                if attempt == self.MAX_RESTARTS:
                    raise RuntimeError(f"data worker {visit % len(self.workers)} died {attempt + 1} times at shard "
                                       f"visit {visit} (from cursor {start}); giving up") from e
                try:  # queued by Ray until the restarted actor is up
                    ray.get(worker.start.remote(start.epoch, start.shard_pos, start.sample_pos, visit))
                except RayActorError as e2:
                    raise RuntimeError(f"data worker {visit % len(self.workers)} could not be restarted after "
                                       f"dying at shard visit {visit}: {e2}") from e
                ref = worker.next_result.remote()
        raise AssertionError("unreachable")

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
        self.workers = []

    @classmethod
    def from_config(cls, data_cfg: Any, batch_size: int, seed: int,
                    encoder_factory: Optional[EncoderFactory] = None, **actor_options: Any) -> "DataWorkerPool":
        """From the trainer's `DataConfig` (shards, workers, prefetch and the read options)."""
        return cls(data_cfg.shards, batch_size, seed, ReadOptions.from_config(data_cfg), data_cfg.workers,
                   data_cfg.prefetch, encoder_factory, actor_options or None)


class BatchFeed:
    """Serves one global stream to many trainer ranks (a Ray actor, see `feed_actor`): rank r asks for step n
    and gets `batch_n.slice(r, world)`; a batch is kept until every rank has taken its slice."""

    def __init__(self, stream_factory: Any):
        self.stream = stream_factory()  # a DataWorkerPool or PromptStream, built on the actor
        self.initial = self.stream.state_dict()
        self.pulled = 0  # global batches taken from the stream
        self.cache: dict[int, tuple[Any, set[int]]] = {}
        self._loaded: Optional[dict[str, Any]] = None

    def get(self, step: int, rank: int, world_size: int, layout: str = "strided") -> Any:
        if step < self.pulled - len(self.cache) and step not in self.cache:
            raise RuntimeError(f"rank {rank} asked for step {step}, already served to every rank and dropped")
        while self.pulled <= step:
            self.cache[self.pulled] = (next(self.stream), set(range(world_size)))
            self.pulled += 1
        batch, waiting = self.cache[step]
        waiting.discard(rank)
        if not waiting:
            del self.cache[step]
        return batch.slice(rank, world_size, layout)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Idempotent: every rank calls it with the same checkpointed cursor; the first call restarts."""
        if state == self._loaded:
            return
        self.stream.load_state_dict(state)
        self.pulled = int(state["batches"])
        self.cache.clear()
        self._loaded = dict(state)

    def initial_state(self) -> dict[str, Any]:
        return dict(self._loaded or self.initial)

    def metrics(self) -> dict[str, float]:
        return self.stream.stats.metrics()

    def close(self) -> None:
        if hasattr(self.stream, "shutdown"):
            self.stream.shutdown()
        self.stream.close()


def feed_actor(stream_factory: Any, **actor_options: Any):
    """Start a `BatchFeed` actor; `stream_factory` (picklable) builds the stream inside it."""
    import ray

    return ray.remote(BatchFeed).options(**{"num_cpus": 0, **actor_options}).remote(stream_factory)


class FeedIterator:
    """A trainer rank's batch iterator over a `BatchFeed` actor (built by cluster/ code; the trainer only
    iterates it and calls state_dict / load_state_dict, so it never imports ray)."""

    def __init__(self, feed: Any, rank: int, world_size: int, layout: str = "strided"):
        self.feed, self.rank, self.world_size, self.layout = feed, rank, world_size, layout
        self.step = 0
        self._state: Optional[dict[str, Any]] = None

    def __iter__(self) -> "FeedIterator":
        return self

    def __next__(self) -> Any:
        import ray

        batch = ray.get(self.feed.get.remote(self.step, self.rank, self.world_size, self.layout))
        self.step += 1
        self._state = batch.cursor
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self._state is None:  # nothing consumed yet: the feed's starting cursor
            import ray

            self._state = ray.get(self.feed.initial_state.remote())
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import ray

        ray.get(self.feed.load_state_dict.remote(state))
        self.step = int(state["batches"])
        self._state = dict(state)


class DataFeed:
    """The launcher's handle on a run's prompt data: the BatchFeed actor (handed to every student rank) and
    the placement group of its DataWorkers. `shutdown()` stops the workers, the feed and frees the group."""

    def __init__(self, actor: Any, placement_group: Any = None):
        self.actor, self.placement_group = actor, placement_group

    def metrics(self) -> dict[str, float]:
        import ray

        return ray.get(self.actor.metrics.remote())

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.actor is not None:
            try:
                ray.get(self.actor.close.remote(), timeout=60)
            finally:
                ray.kill(self.actor)
                self.actor = None
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None


def start_data_feed(cfg: Any, worker_options: Optional[dict[str, Any]] = None) -> DataFeed:
    """The run's global prompt stream (DESIGN.md §5): `data.workers` DataWorker actors read `data.shards` and
    encode the prompts with the config's text encoders (`models.text_encoders.load_text_encoder`, built on
    each worker) unless `data.pre_encoded`; one BatchFeed actor cuts global batches of `train.batch_size`
    from them and serves each rank its slice. `worker_options` are the DataWorkers' actor options
    (`cluster.orchestrator.data_placement(cfg)`: their placement group)."""
    import functools

    import ray

    encoder = None if cfg.data.pre_encoded else functools.partial(_node_text_encoder, cfg)
    options = dict(worker_options or {})
    factory = functools.partial(DataWorkerPool.from_config, cfg.data, cfg.train.batch_size, cfg.run.seed,
                                encoder, **options)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # the one feed actor lives with the driver, or on the nodes of cluster.data_custom_resource (issue 11): a
    # worker node that dies must not take it along
    if cfg.cluster.data_custom_resource:
        actor = feed_actor(factory, resources={cfg.cluster.data_custom_resource: 0.01})
    else:
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        actor = feed_actor(factory, scheduling_strategy=here)
    ray.get(actor.initial_state.remote())  # fail here, with the actor's error, if the shards cannot be listed
    strategy = options.get("scheduling_strategy")
    return DataFeed(actor, getattr(strategy, "placement_group", None))


def _node_text_encoder(cfg: Any):
    """The text encoders, loaded on the data worker's node (hub ids / s3:// dirs resolved into its own cache)."""
    from models.text_encoders import load_text_encoder
    from trainer.weights import with_local_weights

    return load_text_encoder(with_local_weights(cfg))
