"""Global prompt batches in the deterministic order, with an exact-resume cursor.

`PromptStream` reads shards in-process (a thread reads ahead, bounded in bytes: data_pipeline/readahead.py);
the Ray `DataWorker` pool in `cluster/data_worker.py` subclasses `GlobalBatchStream` and feeds the same
`ShardResult` pieces from its actors, so both cut the same batches. Every rank sees the same global batch and
keeps `batch.slice(rank, world)` (`RankBatches` wraps that), so the sequence of consumed samples never depends
on the number of ranks, and a cursor saved by 2 ranks resumes 1 rank (or 8) exactly.

The cursor counts what was handed out, not what was read ahead: `state_dict()` after batch n is the position
just past batch n's last sample, plus the bad-record counters up to there.

Embeddings stay in their stored dtype (`data_pipeline/compact.py`): a batch carries an `EmbeddingBatch`, or,
from DataWorkers, `payloads`: handles to each sample's bytes in Ray's object store, which the consumer fetches
(`PromptBatch.resolve`) so the bytes travel once, from the worker that read them to the rank that uses them.
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Optional

from data_pipeline.compact import Deferred, EmbeddingBatch, from_payload, signature, vote_key
from data_pipeline.order import Cursor, ShardTask, fingerprint, tasks
from data_pipeline.reader import EncoderFactory, ReadOptions, ShardReader, ShardResult
from data_pipeline.records import BadRecord, DataStats, PromptRecord

Layout = Literal["strided", "contiguous"]
STATE_VERSION = 1


@dataclass
class PromptBatch:
    keys: list[str]  # sample keys, global order
    prompts: list[str]
    meta: list[dict[str, Any]]  # per sample: negative_prompt / seed / size when the shard had them
    embeddings: Optional[EmbeddingBatch]  # when encoded or pre-encoded (None while `payloads` are not fetched)
    cursor: dict[str, Any]  # the stream's state_dict() right after this batch
    payloads: Optional[list[Any]] = None  # per sample: a handle to its embeddings' bytes, not fetched yet
    pad_to: dict[str, int] = field(default_factory=dict)  # the global batch's sequence lengths (ragged names)
    telemetry: dict[str, float] = field(default_factory=dict)  # the readers' state when the batch was cut

    def __len__(self) -> int:
        return len(self.keys)

    def slice(self, rank: int, world_size: int, layout: Layout = "strided") -> "PromptBatch":
        """This rank's share: `[rank::world]` (strided) or the rank-th contiguous chunk."""
        n = len(self.keys)
        if n % world_size:
            raise ValueError(f"global batch of {n} prompts does not split over {world_size} ranks")
        if layout == "strided":
            idx = list(range(rank, n, world_size))
        elif layout == "contiguous":
            per = n // world_size
            idx = list(range(rank * per, (rank + 1) * per))
        else:
            raise ValueError(f"layout must be 'strided' or 'contiguous', got {layout!r}")
        return PromptBatch([self.keys[i] for i in idx], [self.prompts[i] for i in idx],
                           [self.meta[i] for i in idx],
                           self.embeddings.slice(idx) if self.embeddings is not None else None, self.cursor,
                           [self.payloads[i] for i in idx] if self.payloads is not None else None,
                           dict(self.pad_to), dict(self.telemetry))

    def resolve(self, fetch: Callable[[list[Any]], list[Any]]) -> "PromptBatch":
        """Fetch the payloads (`fetch(handles)` -> each sample's bytes) into `embeddings`, still compact."""
        if self.payloads is not None:
            self.embeddings = EmbeddingBatch.stack([from_payload(b) for b in fetch(self.payloads)], self.pad_to)
            self.payloads = None
        return self


def _stack_embeddings(records: list[PromptRecord]) -> Optional[EmbeddingBatch]:
    have = [r.embeddings is not None for r in records]
    if not any(have):
        return None
    if not all(have):
        missing = [r.key for r in records if r.embeddings is None][:5]
        raise ValueError(f"batch mixes encoded and un-encoded prompts (no embeddings for keys {missing})")
    return EmbeddingBatch.stack([r.embeddings for r in records])


def embedding_signature(embeddings: Any) -> dict[str, list[int]]:
    """name -> [ndim, *shape[1:]]: what must agree for samples to stack (dim 0, a sequence, may differ)."""
    return signature(embeddings)


class GlobalBatchStream:
    """Cuts `ShardResult`s into global batches and keeps the cursor. Subclasses say where results come from."""

    def __init__(self, shards: list[str], batch_size: int, seed: int, options: ReadOptions):
        if not shards:
            raise ValueError("no prompt shards given")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.shards = list(shards)
        self.batch_size = batch_size
        self.seed = seed
        self.options = options
        from data_pipeline.storage import basename

        self._fingerprint = fingerprint([basename(s) for s in self.shards])
        self._start = Cursor()
        self._batches = 0
        self.stats = DataStats()
        self._schema: Optional[dict[str, list[int]]] = None  # embedding signature (see _check_embeddings)
        self._state = self._make_state(self._start)
        self._gen: Optional[Iterator[PromptBatch]] = None

    # --------------------------------------------------------------------------- to implement
    def _results(self, start: Cursor) -> Iterator[ShardResult]:
        """ShardResults of `tasks(start, ...)`, in task order."""
        raise NotImplementedError

    def _stop(self) -> None:
        """Cancel read-ahead (called before a restart from a new cursor and on close)."""

    # ------------------------------------------------------------------------------ iteration
    def __iter__(self) -> "GlobalBatchStream":
        return self

    def __next__(self) -> PromptBatch:
        if self._gen is None:
            self._gen = self._batches_from(self._start)
        batch = next(self._gen)
        self._state = batch.cursor
        return batch

    def task_iter(self, start: Cursor) -> Iterator[ShardTask]:
        return tasks(start, self.seed, len(self.shards), self.options.shuffle_shards)

    def _batches_from(self, start: Cursor) -> Iterator[PromptBatch]:
        n_shards = len(self.shards)
        pending: list[PromptRecord] = []
        expected = 0
        good = 0
        barren = 0  # consecutive shards without one good sample: a fully bad dataset must not spin forever
        for result in self._results(start):  # the pieces of visit 0, then of visit 1, ...
            if result.task.index != expected:
                raise RuntimeError(f"shard results out of order: got task {result.task.index}, expected {expected}")
            task = result.task
            if result.error is not None:
                self.stats.add_skipped_shard(result.url, result.error)
            self._check_embeddings(result)
            for pos, item in result.items:
                if isinstance(item, BadRecord):
                    self.stats.add_bad(item)
                else:
                    good += 1
                    self.stats.samples += 1
                    if item.truncated_from:
                        self.stats.add_truncated(item.shard, item.key, item.truncated_from, self.options.max_prompt_chars)
                    pending.append(item)
                if len(pending) == self.batch_size:
                    after = (Cursor(task.epoch, task.shard_pos, pos + 1) if pos + 1 < result.num_samples
                             else Cursor(task.epoch, task.shard_pos, 0).next_shard(n_shards))
                    yield self._make_batch(pending, after)
                    pending = []
            if not result.final:
                continue
            expected += 1
            barren, good = (0 if good else barren + 1), 0
            if barren >= n_shards:
                raise RuntimeError(f"{n_shards} shards in a row gave no valid prompt; data stats: "
                                   f"{self.stats.metrics()}; skipped shards: {self.stats.skipped_shards[:3]}")

    def _check_embeddings(self, result: ShardResult) -> None:
        """issue 12: a pre-encoded sample whose embeddings have other names or shapes than the stream's is
        a bad record (skipped, counted), not a batch that fails to stack on every restart. The stream's
        signature is the most common one of the first shard with embeddings (counted over the whole visit from
        its tar headers: `result.votes`, or over the piece for prompts encoded on the fly); it travels in the
        cursor, so a resumed stream judges every later sample exactly as the uninterrupted one."""
        sigs = {pos: signature(item.embeddings) for pos, item in result.items
                if isinstance(item, PromptRecord) and item.embeddings is not None}
        if self._schema is None:
            counts = collections.Counter(result.votes or {})
            if not counts:
                counts = collections.Counter(vote_key(v) for v in sigs.values())
            if counts:
                self._schema = json.loads(max(sorted(counts), key=lambda k: counts[k]))
        if not sigs:
            return
        for i, (pos, item) in enumerate(result.items):
            if pos in sigs and sigs[pos] != self._schema:
                result.items[i] = (pos, BadRecord(item.shard, item.key, "bad_embedding",
                                                  f"embeddings {sigs[pos]} (name: [dims, ...shape[1:]]) differ "
                                                  f"from the stream's {self._schema}"))

    def telemetry(self) -> dict[str, float]:
        """The readers' state (memory, queue depth, time held back), for the metrics of each batch."""
        return {}

    def _make_batch(self, records: list[PromptRecord], after: Cursor) -> PromptBatch:
        self._batches += 1
        deferred = [r.embeddings for r in records if isinstance(r.embeddings, Deferred)]
        if deferred:
            if len(deferred) != len(records):
                raise ValueError("batch mixes fetched and deferred embeddings")
            pad_to: dict[str, int] = {}
            for d in deferred:
                for name, n in d.lengths.items():
                    pad_to[name] = max(pad_to.get(name, 0), n)
            return PromptBatch([r.key for r in records], [r.txt for r in records], [r.meta for r in records],
                               None, self._make_state(after), [d.handle for d in deferred], pad_to,
                               self.telemetry())
        return PromptBatch([r.key for r in records], [r.txt for r in records], [r.meta for r in records],
                           _stack_embeddings(records), self._make_state(after), telemetry=self.telemetry())

    # --------------------------------------------------------------------------------- cursor
    def _make_state(self, c: Cursor) -> dict[str, Any]:
        return {"version": STATE_VERSION, "seed": self.seed, "shards": self._fingerprint,
                "num_shards": len(self.shards), "batch_size": self.batch_size, "epoch": c.epoch,
                "shard_pos": c.shard_pos, "sample_pos": c.sample_pos, "batches": self._batches,
                "stats": self.stats.state_dict(), "emb_schema": self._schema}

    def state_dict(self) -> dict[str, Any]:
        """The position right after the last batch handed out (plain ints/strings: JSON-safe)."""
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (saved by any number of ranks). Shard list and seed must match."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data cursor version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["seed"] != self.seed:
            raise ValueError(f"data cursor was saved with seed {state['seed']}, this run has seed {self.seed}")
        if state["shards"] != self._fingerprint or state["num_shards"] != len(self.shards):
            raise ValueError(f"data cursor was saved for a different shard list ({state['num_shards']} shards, "
                             f"fingerprint {state['shards']}); this run has {len(self.shards)} shards "
                             f"(fingerprint {self._fingerprint})")
        if state["batch_size"] != self.batch_size:
            # Allowed (the sample sequence is unchanged), but the step<->sample mapping shifts: say so.
            import logging

            logging.getLogger(__name__).warning("data cursor saved with batch_size %d, resuming with %d",
                                                state["batch_size"], self.batch_size)
        self._stop()
        self._gen = None
        self._start = Cursor(int(state["epoch"]), int(state["shard_pos"]), int(state["sample_pos"]))
        self._batches = int(state["batches"])
        self.stats = DataStats()
        self.stats.load_state_dict(state["stats"])
        self._schema = state.get("emb_schema")  # absent in cursors written before issue 12
        self._state = self._make_state(self._start)

    def close(self) -> None:
        self._stop()
        self._gen = None


class PromptStream(GlobalBatchStream):
    """In-process reader: pieces of shard visits read ahead on a background thread, at most `prefetch` pieces
    and `max_memory_gb` of samples."""

    def __init__(self, shards: list[str] | str, batch_size: int, seed: int = 0,
                 options: Optional[ReadOptions] = None, encoder_factory: Optional[EncoderFactory] = None,
                 prefetch: int = 2, max_memory_gb: float = 1.0):
        from data_pipeline.shards import resolve_shards

        super().__init__(resolve_shards(shards), batch_size, seed, options or ReadOptions())
        self.reader = ShardReader(self.shards, seed, self.options, encoder_factory)
        self.prefetch, self.max_memory_gb = max(1, prefetch), max_memory_gb
        self._ahead: Any = None

    def _results(self, start: Cursor) -> Iterator[ShardResult]:
        from data_pipeline.reader import PIECE_BYTES
        from data_pipeline.readahead import ReadAhead, ReadFailed, budget

        max_bytes, piece_bytes = budget(self.max_memory_gb, 0, PIECE_BYTES)
        pieces = (p for task in self.task_iter(start) for p in self.reader.pieces(task, piece_bytes=piece_bytes))
        self._ahead = ahead = ReadAhead(pieces, max_bytes, piece_bytes, self.prefetch, "shard-read-ahead")
        while True:
            try:
                yield ahead.get()
            except ReadFailed as e:
                raise e.cause from None

    def telemetry(self) -> dict[str, float]:
        if self._ahead is None:
            return {}
        return {f"data/reader/{k}": v for k, v in self._ahead.stats().items()}

    def _stop(self) -> None:
        if self._ahead is not None:
            self._ahead.stop(join_s=0.0)  # a read in flight finishes on its own; its piece is dropped
            self._ahead = None


class RankBatches:
    """One rank's view of a global stream: an iterator of its slices, with the (global) cursor."""

    def __init__(self, source: GlobalBatchStream, rank: int, world_size: int, layout: Layout = "strided"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.source, self.rank, self.world_size, self.layout = source, rank, world_size, layout

    def __iter__(self) -> "RankBatches":
        return self

    def __next__(self) -> PromptBatch:
        return next(self.source).slice(self.rank, self.world_size, self.layout)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)

    @property
    def stats(self) -> DataStats:
        return self.source.stats
