"""Ray DataWorker actors that read, validate and encode prompt shards, and the driver-side pool that merges
their output into the deterministic global order (DESIGN.md §1, §5).

Shard visits are numbered from the start cursor (`data_pipeline.order.tasks`); worker w of W takes visits
w, w+W, w+2W, ... and streams each one in pieces (`ShardReader.pieces`, what the in-process `PromptStream`
runs) on a background thread whose read-ahead is held under `data.max_memory_gb` (`data_pipeline.readahead`:
it waits instead of growing). The pool asks the workers for pieces in visit order, so `GlobalBatchStream`
cuts the same batches from the same records as `PromptStream`: the order and the cursor do not depend on the
number of workers either.

Embeddings never pass through the pool or the feed (issue 22): a worker puts each sample's embeddings, as
stored (fp8 + scale, bf16), in Ray's object store and hands on a handle (`compact.Deferred`); the rank that
gets the sample fetches it (`FeedIterator`), so the bytes cross Ray once, compact, and are converted to the
compute dtype on the rank's device (trainer/rank_program.py `OnDevice`).

The trainer receives `DataWorkerPool` (or a `RankBatches` over it) as a plain iterator with
`state_dict()` / `load_state_dict()`; it never imports ray.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

from data_pipeline.order import Cursor, ShardTask, tasks
from data_pipeline.reader import PIECE_BYTES, EncoderFactory, ReadOptions, ShardReader, ShardResult
from data_pipeline.stream import GlobalBatchStream


class _Failure:
    """An exception from the worker's read thread, handed to the driver at the piece where it happened."""

    def __init__(self, exc: BaseException):
        import traceback

        self.text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        first = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
        self.summary = f"{type(exc).__name__}: {first}"  # the one line a failure message leads with


class NotStarted(RuntimeError):
    """next_result reached a DataWorker process that was never started: a restarted actor (its first
    process died) got the request before the pool restarted its reading; the pool does that now."""


class DataWorker:
    """Streams this worker's share of shard visits ahead on a thread (a plain class; the pool wraps it in Ray).

    `max_memory_gb`: this process's memory at `start()` plus its read-ahead stays under it (the reader waits
    instead, see data_pipeline/readahead.py); `prefetch`: pieces queued at most. `defer`: put each sample's
    embeddings in Ray's object store and queue handles (the pool's actors; a plain DataWorker keeps them)."""

    def __init__(self, shards: list[str], seed: int, options: ReadOptions, worker_index: int, num_workers: int,
                 prefetch: int = 2, encoder_factory: Optional[EncoderFactory] = None, max_memory_gb: float = 1.0,
                 defer: bool = False):
        # The encoder is built here, on the worker (its GPU in production), on the first shard it reads.
        self.reader = ShardReader(shards, seed, options, encoder_factory)
        self.worker_index, self.num_workers = worker_index, num_workers
        self.prefetch, self.max_memory_gb, self.defer = max(1, prefetch), max_memory_gb, defer
        self._ahead: Any = None
        self._started = False
        self._sent = 0  # bytes of pieces handed on (serialized), payloads apart

    def start(self, epoch: int, shard_pos: int, sample_pos: int, first_visit: int = 0, first_pos: int = 0) -> int:
        """(Re)start reading from a cursor; pieces of an earlier start are dropped. `first_visit` skips the
        visits (numbered from the cursor) before it, `first_pos` the ordered positions of that visit before it:
        a restarted actor resumes where the pool is (issue 7)."""
        from data_pipeline.readahead import ReadAhead, budget, process_memory

        self._halt()
        r = self.reader
        todo = tasks(Cursor(epoch, shard_pos, sample_pos), r.seed, len(r.shards), r.options.shuffle_shards)
        baseline = process_memory()[1]
        max_bytes, piece_bytes = budget(self.max_memory_gb, baseline, PIECE_BYTES)
        self._ahead = ReadAhead(self._pieces(todo, first_visit, first_pos, piece_bytes), max_bytes, piece_bytes,
                                self.prefetch, f"data-worker-{self.worker_index}",
                                transform=self._defer if self.defer else None,
                                rss_limit=int(self.max_memory_gb * (1 << 30)))
        self._started = True
        return self.worker_index

    def _pieces(self, todo: Iterator[ShardTask], first_visit: int, first_pos: int,
                piece_bytes: int) -> Iterator[ShardResult]:
        for task in todo:
            if task.index % self.num_workers != self.worker_index or task.index < first_visit:
                continue
            if task.index == first_visit and first_pos > task.start:
                task = ShardTask(task.index, task.epoch, task.shard_pos, task.shard_index, first_pos)
            yield from self.reader.pieces(task, piece_bytes=piece_bytes)

    @staticmethod
    def _defer(piece: ShardResult) -> ShardResult:
        """Each record's embeddings -> its safetensors bytes in Ray's object store, a handle in their place."""
        import ray

        from data_pipeline.compact import Deferred, lengths, payload, signature
        from data_pipeline.records import PromptRecord

        for _, r in piece.items:
            if isinstance(r, PromptRecord) and isinstance(r.embeddings, dict):
                raw = payload(r.embeddings)
                r.embeddings = Deferred(ray.put(raw), signature(r.embeddings), lengths(r.embeddings), len(raw))
        return piece

    def next_result(self) -> ShardResult:
        """The next piece of this worker's visits (blocks while it is being read)."""
        from data_pipeline.readahead import ReadFailed

        if not self._started:
            raise NotStarted("DataWorker.next_result before start()")
        while True:
            try:
                piece = self._ahead.get(timeout=0.5)
                break
            except TimeoutError:
                if not self._ahead.alive:
                    raise RuntimeError(f"data worker {self.worker_index}: reader thread stopped") from None
            except ReadFailed as e:
                f = _Failure(e.cause)
                raise RuntimeError(f"data worker {self.worker_index} failed: {f.summary}\n{f.text}") from None
        piece.telemetry = self.stats()
        if self.defer:  # what this piece costs Ray besides the payloads it put: keys, prompts, handles
            import ray

            self._sent += ray._private.worker.global_worker.get_serialization_context().serialize(piece).total_bytes
        return piece

    def queued(self) -> int:
        return int(self._ahead.stats()["queued_pieces"]) if self._ahead is not None else 0

    def stats(self) -> dict[str, float]:
        """Memory (process RSS, its private part), read-ahead (bytes, pieces, samples) and time held back."""
        return {**self._ahead.stats(), "sent_mb": self._sent / 2**20} if self._ahead is not None else {}

    def _halt(self) -> None:
        if self._ahead is not None:
            self._ahead.stop(join_s=30)
            self._ahead = None


RESTART_WAIT_S = 900.0  # how long a restarted actor may take to come back (it rebuilds its reader / encoder)


class DataWorkerPool(GlobalBatchStream):
    """`num_workers` DataWorker actors feeding global batches in the same order as `PromptStream`.

    `actor_options` go to `ray.remote(...).options(...)` (e.g. num_cpus, num_gpus, a placement-group
    scheduling strategy, `runtime_env` with NON-secret settings such as PIFLOW_S3_ENDPOINT; credentials
    come from each node's environment or the AWS chain). The embeddings of its batches are fetched here
    (`resolve_payloads`), unless a BatchFeed hands the handles on to the ranks.
    """

    MAX_RESTARTS = 3  # per worker actor: process deaths survived before the stream fails (issue 7)

    def __init__(self, shards: list[str] | str, batch_size: int, seed: int = 0,
                 options: Optional[ReadOptions] = None, num_workers: int = 1, prefetch: int = 2,
                 encoder_factory: Optional[EncoderFactory] = None, actor_options: Optional[dict[str, Any]] = None,
                 max_restarts: int = MAX_RESTARTS, timeout_s: float = 0.0, max_memory_gb: float = 1.0):
        import ray

        from data_pipeline.shards import resolve_shards

        super().__init__(resolve_shards(shards), batch_size, seed, options or ReadOptions())
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        # issue 12: a piece that takes longer than `timeout_s` (0 = no limit) means a hung worker: it is
        # killed and restarted like a dead one
        self.max_restarts, self.timeout_s = max_restarts, timeout_s
        self.resolve_payloads = True
        # max_restarts (issue 7): Ray restarts a dead worker process; `_result` restarts its reading at the lost piece
        opts = {"num_cpus": 1, "max_restarts": max_restarts, **(actor_options or {})}
        actor = ray.remote(DataWorker).options(**opts)
        self.workers = [actor.remote(self.shards, seed, self.options, w, num_workers, prefetch, encoder_factory,
                                     max_memory_gb, True) for w in range(num_workers)]
        self._worker_stats: dict[int, dict[str, float]] = {}

    def _results(self, start: Cursor) -> Iterator[ShardResult]:
        import ray

        ray.get([w.start.remote(start.epoch, start.shard_pos, start.sample_pos) for w in self.workers])
        n = len(self.workers)
        # one request in flight per worker (each worker reads ahead on its own); pieces come in visit order
        pending = {w: self.workers[w].next_result.remote() for w in range(n)}
        visit, got = 0, -1  # the visit being consumed, the last ordered position received of it
        while True:
            w = visit % n
            piece = self._result(visit, got, pending[w], start)
            pending[w] = self.workers[w].next_result.remote()
            self._worker_stats[w] = piece.telemetry or {}
            got = max([got] + [p for p, _ in piece.items])
            yield piece
            if piece.final:
                visit, got = visit + 1, -1

    def _result(self, visit: int, got: int, ref: Any, start: Cursor) -> ShardResult:
        """The next piece of shard visit `visit`, whose positions up to `got` were received. If its worker died
        (issue 7), Ray restarts the actor (its max_restarts) and the worker starts reading again AT this visit,
        from position `got + 1`: the stream has consumed exactly what came before, and the worker's lost
        read-ahead is re-read, so no sample is lost or repeated."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        worker = self.workers[visit % len(self.workers)]
        for attempt in range(self.max_restarts + 1):
            try:
                return ray.get(ref, timeout=self.timeout_s or None)
            except (RayActorError, GetTimeoutError, RayTaskError) as e:
                if isinstance(e, RayTaskError) and not isinstance(e, RayActorError) \
                        and not isinstance(getattr(e, "cause", None), NotStarted) and "before start()" not in str(e):
                    raise  # a real error of the reader: surfaced as it is
                if isinstance(e, GetTimeoutError):  # hung (a stuck read or encoder): restart it like a dead one
                    ray.kill(worker, no_restart=False)
                if attempt == self.max_restarts:
                    raise RuntimeError(f"data worker {visit % len(self.workers)} died {attempt + 1} times at shard "
                                       f"visit {visit} (from cursor {start}); giving up") from e
                try:  # queued by Ray until the restarted actor is up
                    call_with_restart(worker, "start", start.epoch, start.shard_pos, start.sample_pos, visit,
                                      got + 1, timeout_s=RESTART_WAIT_S, retries=0,
                                      what=f"data worker {visit % len(self.workers)}")
                except RuntimeError as e2:
                    raise RuntimeError(f"data worker {visit % len(self.workers)} could not be restarted after "
                                       f"dying at shard visit {visit}: {e2}") from e
                ref = worker.next_result.remote()
        raise AssertionError("unreachable")

    def telemetry(self) -> dict[str, float]:
        """Per worker, as of its last piece: memory, read-ahead, queue depth, time held back by its cap."""
        keys = ("rss_gb", "private_gb", "readahead_mb", "queued_pieces", "queued_samples", "held_s")
        return {f"data/worker{w}/{k}": s[k] for w, s in sorted(self._worker_stats.items()) for k in keys if k in s}

    def __next__(self):
        before = self.state_dict()
        for attempt in range(self.max_restarts + 1):
            batch = super().__next__()
            if not self.resolve_payloads or batch.payloads is None:
                return batch
            try:
                return batch.resolve(fetch_payloads)
            except PayloadLost:
                if attempt == self.max_restarts:
                    raise
                self.load_state_dict(before)  # a worker that held them died: read that batch again
        raise AssertionError("unreachable")

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
        self.workers = []

    @classmethod
    def from_config(cls, data_cfg: Any, batch_size: int, seed: int,
                    encoder_factory: Optional[EncoderFactory] = None, **actor_options: Any) -> "DataWorkerPool":
        """From the trainer's `DataConfig` (shards, workers, prefetch, memory and the read options)."""
        return cls(data_cfg.shards, batch_size, seed, ReadOptions.from_config(data_cfg), data_cfg.workers,
                   data_cfg.prefetch, encoder_factory, actor_options or None,
                   max_restarts=data_cfg.max_restarts, timeout_s=data_cfg.timeout_s,
                   max_memory_gb=data_cfg.max_memory_gb)


class PayloadLost(RuntimeError):
    """A sample's embeddings are gone from Ray's object store (the DataWorker that put them died)."""


def fetch_payloads(handles: list[Any], timeout_s: float = 0.0) -> list[Any]:
    """The bytes behind DataWorker handles (`PromptBatch.resolve`); PayloadLost when their owner died."""
    import ray
    from ray.exceptions import ObjectLostError, OwnerDiedError

    try:
        return ray.get(list(handles), timeout=timeout_s or None)
    except (ObjectLostError, OwnerDiedError) as e:
        raise PayloadLost(f"prompt embeddings lost with their data worker ({type(e).__name__})") from e


class StaleAttempt(RuntimeError):
    """A rank of a student-group attempt that a newer attempt has replaced asked the feed for a batch."""


class BatchFeed:
    """Serves one global stream to many trainer ranks (a Ray actor, see `feed_actor`): rank r asks for step n
    and gets `batch_n.slice(r, world)`; a batch is kept until every rank has taken its slice.

    Restart-safe (issue 12): every request names the student group's attempt (one id per Ray Train
    (re)start, `group_attempt_id`) and the cursor the rank consumed up to. The first request of a new attempt
    rewinds the stream to that cursor (the checkpoint the attempt resumed from, or the start), however often
    the group restarts from the same checkpoint; a request for a step the feed no longer holds (the feed
    actor itself was restarted, or a rank is behind) rewinds to the rank's cursor too. The stream is a pure
    function of the cursor, so a rewind hands out exactly the batches an uninterrupted feed would have."""

    def __init__(self, stream_factory: Any):
        self.stream = stream_factory()  # a DataWorkerPool or PromptStream, built on the actor
        if hasattr(self.stream, "resolve_payloads"):
            self.stream.resolve_payloads = False  # the ranks fetch the embeddings from the workers themselves
        self.initial = self.stream.state_dict()
        self.pulled = 0  # global batches taken from the stream
        self.cache: dict[int, tuple[Any, set[int]]] = {}
        self.attempt: Optional[str] = None
        self.retired: set[str] = set()  # attempts a newer one replaced: their leftover ranks are refused
        self.rewinds = 0

    def get(self, attempt: str, step: int, rank: int, world_size: int, layout: str = "strided",
            state: Optional[dict[str, Any]] = None, refetch: bool = False) -> Any:
        """Rank `rank`'s slice of global batch `step`; `state` is the cursor after the batches it consumed
        (None = the stream's start), i.e. where batch `step` begins. `refetch`: the embeddings of the slice
        this rank got were lost with their DataWorker: read the batch again from `state`."""
        if int((state or self.initial)["batches"]) != step:
            raise ValueError(f"rank {rank} asked for step {step} with a cursor at batch {(state or {}).get('batches')}")
        if attempt in self.retired:
            raise StaleAttempt(f"rank {rank} of a replaced student-group attempt asked for step {step}")
        if attempt != self.attempt:
            if self.attempt is not None:
                self.retired.add(self.attempt)
            self.attempt = attempt
            self._rewind(state)
        elif refetch or (step < self.pulled and step not in self.cache):
            self._rewind(state)
        for s in [s for s in self.cache if s < step]:  # this rank is past them (it took them before a rewind)
            self._taken(s, rank)
        while self.pulled <= step:
            self.cache[self.pulled] = (next(self.stream), set(range(world_size)))
            self.pulled += 1
        batch = self.cache[step][0]
        self._taken(step, rank)
        return batch.slice(rank, world_size, layout)

    def _taken(self, step: int, rank: int) -> None:
        waiting = self.cache[step][1]
        waiting.discard(rank)
        if not waiting:
            del self.cache[step]

    def _rewind(self, state: Optional[dict[str, Any]]) -> None:
        self.stream.load_state_dict(dict(state or self.initial))
        self.pulled = int((state or self.initial)["batches"])
        self.cache.clear()
        self.rewinds += 1

    def initial_state(self) -> dict[str, Any]:
        return dict(self.initial)

    def metrics(self) -> dict[str, float]:
        return {**self.stream.stats.metrics(), **self.stream.telemetry(),
                "data/feed/cached_batches": float(len(self.cache))}

    def close(self) -> None:
        if hasattr(self.stream, "shutdown"):
            self.stream.shutdown()
        self.stream.close()


def feed_actor(stream_factory: Any, max_restarts: int = 3, **actor_options: Any):
    """Start a `BatchFeed` actor; `stream_factory` (picklable) builds the stream inside it. A dead feed is
    restarted by Ray (`max_restarts`); its DataWorkers die with it and the new one builds its own."""
    import ray

    opts = {"num_cpus": 0, "max_restarts": max_restarts, **actor_options}
    return ray.remote(BatchFeed).options(**opts).remote(stream_factory)


def group_attempt_id() -> str:
    """One id shared by every rank of this student-group attempt (rank 0 draws it, the process group
    broadcasts it); a new id on every Ray Train restart. Outside a process group, a fresh id."""
    import secrets

    value = secrets.randbits(62)
    try:
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([value], dtype=torch.int64, device=device)
            dist.broadcast(t, src=0)
            value = int(t.item())
    except ImportError:
        pass
    return f"{value:016x}"


def call_with_restart(actor: Any, method: str, *args: Any, timeout_s: float = 0.0, retries: int = 1,
                      what: str = "actor") -> Any:
    """`actor.method.remote(*args)` with a timeout (0 = none). A call that hangs past `timeout_s` kills the
    actor so Ray restarts it (its `max_restarts`); a call whose actor died waits for the restart; either is
    retried `retries` times before a RuntimeError naming `what` and the cause."""
    import time

    import ray
    from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

    cause = ""
    failures = 0
    restarting_until = 0.0
    while failures <= retries:
        try:
            return ray.get(getattr(actor, method).remote(*args), timeout=timeout_s or None)
        except ActorUnavailableError as e:  # restarting (or the call raced its death): wait for the new process
            restarting_until = restarting_until or time.monotonic() + RESTART_WAIT_S
            if time.monotonic() < restarting_until:
                time.sleep(0.2)
                continue
            failures, cause = failures + 1, f"unavailable for {RESTART_WAIT_S:g} s ({_first_line(e)})"
        except GetTimeoutError:
            failures, cause = failures + 1, f"no answer in {timeout_s:g} s"
            ray.kill(actor, no_restart=False)  # hung: restart it; the retry reaches the new process
        except RayActorError as e:
            failures, cause = failures + 1, f"the actor died ({_first_line(e)})"
        restarting_until = 0.0
    raise RuntimeError(f"{what}: {method} failed {failures} times, last: {cause}")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


class FeedIterator:
    """A trainer rank's batch iterator over a `BatchFeed` actor (built by cluster/ code; the trainer only
    iterates it and calls state_dict / load_state_dict, so it never imports ray). `load_state_dict` is local:
    the cursor travels with the next request, and the feed rewinds to it when needed (see BatchFeed)."""

    def __init__(self, feed: Any, rank: int, world_size: int, layout: str = "strided",
                 attempt: Optional[str] = None, timeout_s: float = 0.0, retries: int = 1):
        self.feed, self.rank, self.world_size, self.layout = feed, rank, world_size, layout
        self.attempt = attempt or group_attempt_id()
        self.timeout_s, self.retries = timeout_s, retries
        self.step = 0
        self._state: Optional[dict[str, Any]] = None  # cursor after the batches consumed; None = the start

    def __iter__(self) -> "FeedIterator":
        return self

    def _call(self, method: str, *args: Any) -> Any:
        return call_with_restart(self.feed, method, *args, timeout_s=self.timeout_s, retries=self.retries,
                                 what=f"data feed (rank {self.rank})")

    def __next__(self) -> Any:
        batch = self._call("get", self.attempt, self.step, self.rank, self.world_size, self.layout, self._state)
        for _ in range(self.retries + 1):
            try:  # the embeddings come from the DataWorkers' object store, not through the feed
                batch.resolve(lambda handles: fetch_payloads(handles, self.timeout_s))
                break
            except PayloadLost:
                batch = self._call("get", self.attempt, self.step, self.rank, self.world_size, self.layout,
                                   self._state, True)
        else:
            batch.resolve(lambda handles: fetch_payloads(handles, self.timeout_s))
        self.step += 1
        self._state = batch.cursor
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self._state is None:  # nothing consumed yet: the feed's starting cursor
            self._state = self._call("initial_state")
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
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
    encode the prompts with the config's text encoders (`models.families.load_text_encoder`, built on
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
        actor = feed_actor(factory, max_restarts=cfg.data.max_restarts,
                           resources={cfg.cluster.data_custom_resource: 0.01})
    else:
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        actor = feed_actor(factory, max_restarts=cfg.data.max_restarts, scheduling_strategy=here)
    ray.get(actor.initial_state.remote())  # fail here, with the actor's error, if the shards cannot be listed
    strategy = options.get("scheduling_strategy")
    return DataFeed(actor, getattr(strategy, "placement_group", None))


def _node_text_encoder(cfg: Any):
    """The text encoders, loaded on the data worker's node (hub ids / s3:// dirs resolved into its own cache)."""
    from models.families import load_text_encoder
    from trainer.weights import with_local_weights

    return load_text_encoder(with_local_weights(cfg))
