"""Reading one shard visit as a stream of pieces: index with retries, then sample by sample in the global
order, validated and optionally encoded (issue 22: a shard is no longer held whole).

`ShardReader.pieces(task)` indexes the shard (`tar_index.scan`: headers only, integrity checked before any
sample is used), then reads its samples from ordered position `task.start` on, each with one ranged read, and
yields them in `ShardResult` pieces of at most `piece_samples` samples / `piece_bytes` bytes. A truncated or
corrupt shard is re-read with backoff (the damage may be a transient short read), then skipped whole and
reported. A sample that cannot be fetched after the same retries once the shard is under way (the object was
replaced or cut, the store failed for longer than `data.retry_window_s`) ends the visit: the samples before it
were used, the shard is reported as skipped from there. A member that cannot be extracted (a link, a device, a
name without an extension) makes its sample a bad record; the rest of the shard is used.

The pieces are the unit both the in-process `PromptStream` and the Ray `DataWorker`s read ahead (bounded in
bytes, data_pipeline/readahead.py), so both produce the same records in the same order. With an encoder, a
piece ends only where an encoder call ends: the calls cut the same prompts together as a whole-shard read.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

from data_pipeline import storage
from data_pipeline.order import ShardTask, sample_order
from data_pipeline.records import LATENT_KEY, BadRecord, Overlong, PromptRecord, validate_sample
from data_pipeline.tar_index import ShardIndex, ShardUnreadable, scan, split_member_name  # noqa: F401 - re-exported

Encoder = Callable[[list[str]], dict[str, Any]]  # prompts -> {name: Tensor (B, ...)}
EncoderFactory = Callable[[], Encoder]  # picklable; builds the encoder where it runs (a DataWorker's GPU)

PIECE_SAMPLES = 64
PIECE_BYTES = 64 << 20


@dataclass
class ReadOptions:
    max_prompt_chars: int = 2000
    overlong: Overlong = "truncate"
    shuffle_shards: bool = True
    shuffle_within_shard: bool = True
    pre_encoded: bool = False  # every sample must carry embeddings
    read_attempts: int = 4
    read_backoff_s: float = 0.5
    encode_batch_size: int = 64
    retry_window_s: float = 120.0  # transient object-store errors are retried this long before a skip

    @classmethod
    def from_config(cls, data_cfg: Any) -> "ReadOptions":
        """From the trainer's `DataConfig` (duck-typed: data_pipeline never imports trainer)."""
        return cls(max_prompt_chars=data_cfg.max_prompt_chars, overlong=data_cfg.overlong,
                   shuffle_shards=data_cfg.shuffle_shards, shuffle_within_shard=data_cfg.shuffle_within_shard,
                   pre_encoded=data_cfg.pre_encoded, read_attempts=data_cfg.read_attempts,
                   read_backoff_s=data_cfg.read_backoff_s, encode_batch_size=data_cfg.encode_batch_size,
                   retry_window_s=data_cfg.retry_window_s)


Item = Union[PromptRecord, BadRecord]


@dataclass
class ShardResult:
    """A piece of one shard visit: consecutive ordered positions. A visit is its pieces from `first` to
    `final`; `read()` merges them into one."""

    task: ShardTask
    url: str
    num_samples: int  # raw samples in the shard (0 if unreadable)
    items: list[tuple[int, Item]] = field(default_factory=list)  # (ordered position, record or bad), from task.start
    error: Optional[str] = None  # set when the shard (or its rest, from this piece on) was skipped
    first: bool = True
    final: bool = True
    votes: Optional[dict[str, int]] = None  # embedding signature (JSON) -> samples, over the visit (first piece)
    telemetry: Optional[dict[str, float]] = None  # the DataWorker's state when it handed this piece on

    @property
    def nbytes(self) -> int:
        """The bytes its records hold (embeddings as they are now, prompts)."""
        from data_pipeline.compact import nbytes

        return sum(nbytes(r.embeddings) + len(r.txt) for _, r in self.items if isinstance(r, PromptRecord))


# --------------------------------------------------------------------------------------------- retrying
def retrying(fn: Callable[[], Any], url: str, attempts: int, backoff_s: float, window_s: float = 120.0) -> Any:
    """`fn()` under the shard rules (issue 12):
    - transient object-store errors (5xx, throttling, resets, timeouts) are retried with backoff for
      `window_s` seconds (a blip must not skip a shard for good), then ShardUnreadable;
    - a missing / truncated / corrupt shard is tried `attempts` times with backoff, then ShardUnreadable;
    - credential and permission errors raise `storage.StorageAccessError` at once: not a bad shard."""
    last, tries, deadline, k = "", 0, 0.0, 0
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified here
            if storage.is_auth_error(e):
                raise storage.access_error(url, e) from None
            if not isinstance(e, (ShardUnreadable, OSError)) and not storage.is_transient(e):
                raise
            last = f"{type(e).__name__}: {e}"
            if storage.is_transient(e):
                deadline = deadline or time.monotonic() + window_s
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ShardUnreadable(f"{last} (transient errors for {window_s:g} s, data.retry_window_s)")
                time.sleep(min(left, max(backoff_s, 0.05) * (2 ** min(k, 6)), 10.0))
                k += 1
                continue
        tries += 1
        if tries >= attempts:
            raise ShardUnreadable(f"{last} (after {attempts} attempts)")
        time.sleep(backoff_s * (2 ** (tries - 1)))


def parse_tar(data: bytes, shard: str) -> tuple[list[tuple[str, dict[str, bytes]]], list[BadRecord]]:
    """Samples (key, {ext: bytes}) in tar order and the bad members of a shard held in memory (the batch jobs
    that want whole shards). Raises ShardUnreadable like `tar_index.scan`."""
    from data_pipeline.tar_index import _Bytes, walk

    spans, bad = walk(_Bytes(data), shard)
    return [(s.key, s.cut(data[s.start:s.end])) for s in spans], bad


def fetch_samples(url: str, attempts: int, backoff_s: float, window_s: float = 120.0,
                  ) -> tuple[list[tuple[str, dict[str, bytes]]], list[BadRecord]]:
    """Fetch a whole shard and parse it (`retrying`'s rules)."""
    name = storage.basename(url)
    return retrying(lambda: parse_tar(storage.get_bytes(url, attempts=1), name), url, attempts, backoff_s, window_s)


# ------------------------------------------------------------------------------------------------ reader
class ShardReader:
    """Reads `ShardTask`s of a fixed shard list into ordered, validated (and optionally encoded) items."""

    def __init__(self, shards: list[str], seed: int, options: ReadOptions,
                 encoder_factory: Optional[EncoderFactory] = None):
        self.shards = list(shards)
        self.seed = seed
        self.options = options
        self.encoder_factory = encoder_factory
        self._encoder: Optional[Encoder] = None

    def encoder(self) -> Optional[Encoder]:
        if self._encoder is None and self.encoder_factory is not None:
            self._encoder = self.encoder_factory()
        return self._encoder

    def read(self, task: ShardTask) -> ShardResult:
        """The whole visit in one result (inspection and the batch jobs; training streams `pieces`)."""
        parts = list(self.pieces(task, piece_samples=1 << 62, piece_bytes=1 << 62))
        out = parts[0]
        for p in parts[1:]:
            out.items += p.items
            out.error = p.error or out.error
        out.final = True
        return out

    def _retry(self, fn: Callable[[], Any], url: str) -> Any:
        o = self.options
        return retrying(fn, url, o.read_attempts, o.read_backoff_s, o.retry_window_s)

    def pieces(self, task: ShardTask, piece_samples: Optional[int] = None,
               piece_bytes: Optional[int] = None) -> Iterator[ShardResult]:
        """The visit's items from `task.start` on, in pieces (see the module docstring)."""
        o = self.options
        piece_samples, piece_bytes = piece_samples or PIECE_SAMPLES, piece_bytes or PIECE_BYTES
        url = self.shards[task.shard_index]
        name = storage.basename(url)
        try:
            index: ShardIndex = self._retry(lambda: scan(url, name, o), url)
        except ShardUnreadable as e:
            yield ShardResult(task, url, 0, [], error=str(e))
            return
        try:
            n = len(index.spans)
            order = sample_order(self.seed, task.epoch, name, n, o.shuffle_within_shard)
            # the schema vote from the tar headers; prompts encoded here have no embeddings in the shard, so
            # with an encoder the stream votes over each piece's encoded records instead
            votes = collections.Counter() if self.encoder_factory is not None else collections.Counter(
                index.spans[order[p]].vote for p in range(task.start, n) if index.spans[order[p]].vote is not None)
            # Unnamed members (not part of any sample) are reported once, at the shard's first visit.
            items: list[tuple[int, Item]] = [(-1, b) for b in index.unnamed] if task.start == 0 else []
            chunk: list[PromptRecord] = []  # records waiting for the encoder
            first = True

            def piece(final: bool, error: Optional[str] = None) -> ShardResult:
                return ShardResult(task, url, n, items, error, first, final, dict(votes) if first else None)

            encode = self.encoder() is not None
            held = 0  # bytes the current piece holds
            for pos in range(task.start, n):
                span = index.spans[order[pos]]
                try:
                    item = span.bad or self._sample(index, span, name, url)
                except ShardUnreadable as e:
                    self._encode(chunk)
                    yield piece(True, f"{e} (at its sample {pos} of {n} in read order: the rest of the shard "
                                      "is skipped)")
                    return
                items.append((pos, item))
                held += piece_nbytes([(pos, item)])
                if encode and isinstance(item, PromptRecord) and not set(item.embeddings or ()) - {LATENT_KEY}:
                    chunk.append(item)
                    if len(chunk) == max(1, o.encode_batch_size):
                        held += self._encode(chunk)
                        chunk = []
                if not chunk and pos + 1 < n and (len(items) >= piece_samples or held >= piece_bytes):
                    yield piece(False)
                    items, first, held = [], False, 0
            self._encode(chunk)
            yield piece(True)
        finally:
            index.close()

    def _sample(self, index: ShardIndex, span: Any, shard: str, url: str) -> Item:
        o = self.options

        def fetch() -> bytes:
            raw = index.source.read(span.start, span.end)
            if len(raw) != span.end - span.start:
                raise ShardUnreadable(f"truncated since it was indexed: sample {span.key!r} has "
                                      f"{len(raw)} of {span.end - span.start} bytes")
            return raw

        raw = self._retry(fetch, url)
        record, bad = validate_sample(span.key, span.cut(raw), shard, o.max_prompt_chars, o.overlong,
                                      need_embeddings=o.pre_encoded)
        return record if record is not None else bad

    def _encode(self, todo: list[PromptRecord]) -> int:
        """Encode `todo` in one call; returns the bytes it added."""
        encode = self.encoder()
        if encode is None or not todo:
            return 0
        before = piece_nbytes([(0, r) for r in todo])
        out = encode([r.txt for r in todo])
        for name, t in out.items():
            if t.shape[0] != len(todo):
                raise ValueError(f"encoder output {name!r} has batch {t.shape[0]}, expected {len(todo)}")
        for j, r in enumerate(todo):
            # clone: a view would carry (and pickle) the whole batch's storage
            r.embeddings = {**(r.embeddings or {}), **{name: t[j].detach().clone() for name, t in out.items()}}
        return piece_nbytes([(0, r) for r in todo]) - before


def piece_nbytes(items: list[tuple[int, Item]]) -> int:
    from data_pipeline.compact import nbytes

    return sum(nbytes(r.embeddings) + len(r.txt) for _, r in items if isinstance(r, PromptRecord))
