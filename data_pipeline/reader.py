"""Reading one shard: fetch with retries, parse the tar strictly, order, validate, optionally encode.

A shard is fetched whole (prompt shards are small; keep pre-encoded shards to a few hundred samples) and
parsed with `tarfile`, checking what webdataset's streaming reader lets pass silently: a truncated archive
or a corrupt header in the middle ends `tarfile` iteration without an error, so the bytes after the last
member must be the zero end-of-archive blocks. A truncated or corrupt shard is re-fetched with backoff (the
damage may be a transient short read), then skipped and reported. A member that cannot be extracted (a link,
a device, a name without an extension) makes its sample a bad record; the rest of the shard is used.

`ShardReader.read(task)` is the unit of work both the in-process `PromptStream` and the Ray `DataWorker`s run,
so both produce the same records in the same order.
"""
from __future__ import annotations

import io
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from data_pipeline import storage
from data_pipeline.order import ShardTask, sample_order
from data_pipeline.records import LATENT_KEY, BadRecord, Overlong, PromptRecord, validate_sample

Encoder = Callable[[list[str]], dict[str, Any]]  # prompts -> {name: Tensor (B, ...)}
EncoderFactory = Callable[[], Encoder]  # picklable; builds the encoder where it runs (a DataWorker's GPU)


class ShardUnreadable(Exception):
    """A shard that could not be read after all retries (missing, truncated, corrupt)."""


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
    task: ShardTask
    url: str
    num_samples: int  # raw samples in the shard (0 if unreadable)
    items: list[tuple[int, Item]] = field(default_factory=list)  # (ordered position, record or bad), from task.start
    error: Optional[str] = None  # set when the shard was skipped


# ------------------------------------------------------------------------------------------- tar parsing
def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's convention: key = path up to the first dot of the file name, extension = the rest."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        raise ValueError(f"member name {name!r} has no KEY.EXTENSION form")
    return (f"{head}/{stem}" if head else stem), ext


def parse_tar(data: bytes, shard: str) -> tuple[list[tuple[str, dict[str, bytes]]], list[BadRecord]]:
    """Samples (key, {ext: bytes}) in tar order, and the keys whose members could not be read.

    Raises ShardUnreadable for an archive that is not a tar, is truncated, or is corrupt mid-way.
    """
    samples: list[tuple[str, dict[str, bytes]]] = []
    bad: dict[str, BadRecord] = {}
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except tarfile.TarError as e:
        raise ShardUnreadable(f"not a tar archive: {e}") from None
    end = 0
    try:
        for member in tar:
            end = member.offset_data + ((member.size + 511) // 512) * 512
            try:
                key, ext = split_member_name(member.name)
            except ValueError as e:
                if member.isfile():  # an unnamed regular file cannot belong to any sample
                    bad.setdefault(member.name, BadRecord(shard, member.name, "unreadable_member", str(e)))
                continue
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            if not member.isfile():
                bad.setdefault(key, BadRecord(shard, key, "unreadable_member",
                                              f"{member.name}: not a regular file (type {member.type!r})"))
                continue
            f = tar.extractfile(member)
            payload = f.read() if f is not None else b""
            if len(payload) != member.size:
                raise ShardUnreadable(f"truncated: member {member.name} has {len(payload)} of {member.size} bytes")
            samples[-1][1][ext] = payload
    except tarfile.TarError as e:
        raise ShardUnreadable(f"corrupt tar: {e}") from None
    tail = data[end:]
    if len(tail) < 1024 or tail.count(0) != len(tail):
        raise ShardUnreadable(f"truncated or corrupt after byte {end} of {len(data)} (no end-of-archive marker)")
    return samples, list(bad.values())


def fetch_samples(url: str, attempts: int, backoff_s: float, window_s: float = 120.0,
                  ) -> tuple[list[tuple[str, dict[str, bytes]]], list[BadRecord]]:
    """Fetch and parse a shard (issue 12 rules):
    - transient object-store errors (5xx, throttling, resets, timeouts) are retried with backoff for
      `window_s` seconds (a blip must not skip a shard for good), then the shard is skipped;
    - a missing / truncated / corrupt shard is tried `attempts` times with backoff, then skipped;
    - credential and permission errors raise `storage.StorageAccessError` at once: not a bad shard."""
    name = storage.basename(url)
    last, tries, deadline, k = "", 0, 0.0, 0
    while True:
        try:
            data = storage.get_bytes(url, attempts=1)  # this loop does the retrying
            return parse_tar(data, name)
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
        o = self.options
        url = self.shards[task.shard_index]
        name = storage.basename(url)
        try:
            samples, unreadable = fetch_samples(url, o.read_attempts, o.read_backoff_s, o.retry_window_s)
        except ShardUnreadable as e:
            return ShardResult(task, url, 0, [], error=str(e))
        unreadable_keys = {b.key: b for b in unreadable}
        order = sample_order(self.seed, task.epoch, name, len(samples), o.shuffle_within_shard)
        items: list[tuple[int, Item]] = []
        for pos in range(task.start, len(samples)):
            key, members = samples[order[pos]]
            if key in unreadable_keys:
                items.append((pos, unreadable_keys[key]))
                continue
            record, bad = validate_sample(key, members, name, o.max_prompt_chars, o.overlong,
                                          need_embeddings=o.pre_encoded)
            items.append((pos, record if record is not None else bad))
        # Unnamed members (not part of any sample) are reported once, at the shard's first visit.
        if task.start == 0:
            keys = {k for k, _ in samples}
            items = [(-1, b) for b in unreadable if b.key not in keys] + items
        self._encode(items)
        return ShardResult(task, url, len(samples), items)

    def _encode(self, items: list[tuple[int, Item]]) -> None:
        encode = self.encoder()
        if encode is None:
            return
        # a latent shard's sample carries its data latent but (unless pre-encoded) no text embeddings yet
        todo = [r for _, r in items if isinstance(r, PromptRecord) and not set(r.embeddings or ()) - {LATENT_KEY}]
        n = max(1, self.options.encode_batch_size)
        for i in range(0, len(todo), n):
            chunk = todo[i:i + n]
            out = encode([r.txt for r in chunk])
            for name, t in out.items():
                if t.shape[0] != len(chunk):
                    raise ValueError(f"encoder output {name!r} has batch {t.shape[0]}, expected {len(chunk)}")
            for j, r in enumerate(chunk):
                # clone: a view would carry (and pickle) the whole batch's storage
                r.embeddings = {**(r.embeddings or {}), **{name: t[j].detach().clone() for name, t in out.items()}}

