"""The index of one shard, read from its tar headers without its payloads (issue 22).

A streaming reader must still visit a shard's samples in the order `order.sample_order` fixes over ALL of the
shard's samples, so it first needs their number and where each one lies. `scan` walks the tar headers through
ranged reads (`storage.RangeReader`: blocks of 64 KiB, so a 2 MB embedding member costs one small read, not its
bytes) and returns, per sample in tar order, its members' byte ranges; the reader then fetches each sample with
ONE ranged read, in any order, and only holds the samples it has read ahead. A shard smaller than
`WHOLE_BYTES` is fetched in one GET and indexed in memory (a prompt shard: one request, as before).

The integrity checks of the whole-shard reader stay (webdataset's streaming reader lets both pass silently):
a corrupt header mid-way ends `tarfile` iteration without an error, and a truncated archive loses its end, so
after the last member there must be the zero end-of-archive blocks up to the end of the object. Both are
found by the scan, BEFORE any sample of the shard is handed out: a damaged shard is skipped whole and reported
(the choice: no sample before the damage is used, so the order of every other shard stays today's).

For the stream's embedding-schema vote (stream.py), each sample's embedding names and shapes are read from
member headers where the format has one (`safetensors`: its JSON header; `.npy`: its array header); a `.pth`
member has none and is loaded once here (a second read: write safetensors shards, `piflow shards encode`).
"""
from __future__ import annotations

import io
import json
import struct
import tarfile
from dataclasses import dataclass, field
from typing import Any, Optional

from data_pipeline import storage
from data_pipeline.records import LATENT_KEY, BadRecord, validate_sample

WHOLE_BYTES = 16 << 20  # a shard up to this size is fetched in one GET
BLOCK = 64 << 10  # ranged header reads
TAIL_CHUNK = 1 << 20


class ShardUnreadable(Exception):
    """A shard that could not be read after all retries (missing, truncated, corrupt)."""


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's convention: key = path up to the first dot of the file name, extension = the rest."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        raise ValueError(f"member name {name!r} has no KEY.EXTENSION form")
    return (f"{head}/{stem}" if head else stem), ext


def is_embedding_member(ext: str) -> bool:
    return ext.endswith((".pth", ".npy", ".safetensors")) or ext in ("pth", "npy", "safetensors")


# ---------------------------------------------------------------------------------------------- sources
class _Bytes:
    """A shard fetched whole."""

    def __init__(self, data: bytes):
        self.data = data

    def read(self, start: int, end: int) -> bytes:
        return self.data[start:end]

    def size(self) -> int:
        return len(self.data)

    def close(self) -> None:
        self.data = b""


def open_source(url: str) -> Any:
    """`read(start, end)` / `size()` / `close()` over the shard: whole in memory when small, else ranged."""
    ranged = storage.RangeReader(url)
    try:
        head = ranged.read(0, WHOLE_BYTES)
    except BaseException:
        ranged.close()
        raise
    if len(head) < WHOLE_BYTES:
        ranged.close()
        return _Bytes(head)
    return _Ranged(ranged, head)


class _Ranged:
    def __init__(self, ranged: storage.RangeReader, head: bytes):
        self.ranged, self._size = ranged, None
        self.first = head  # the first block: the scan's first headers come from it

    def read(self, start: int, end: int) -> bytes:
        if end <= len(self.first):
            return self.first[start:end]
        return self.ranged.read(start, end)

    def size(self) -> int:
        if self._size is None:
            self._size = self.ranged.size()
        return self._size

    def close(self) -> None:
        self.first = b""
        self.ranged.close()


class _View:
    """A seekable file over a source for `tarfile`, caching one block: header reads cost a ranged GET only
    when they leave the block (after a large member's payload)."""

    def __init__(self, src: Any, size: int):
        self.src, self.end, self.pos = src, size, 0
        self._at, self._buf = 0, b""

    def pread(self, start: int, n: int) -> bytes:
        stop = min(start + n, self.end)
        if start >= stop:
            return b""
        if self._at <= start and stop <= self._at + len(self._buf):
            return self._buf[start - self._at:stop - self._at]
        if stop - start > BLOCK:
            return self.src.read(start, stop)
        self._at, self._buf = start, self.src.read(start, min(start + BLOCK, self.end))
        return self._buf[:stop - start]

    def read(self, n: int = -1) -> bytes:
        out = self.pread(self.pos, self.end - self.pos if n is None or n < 0 else n)
        self.pos += len(out)
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else (self.pos + offset if whence == 1 else self.end + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


# ------------------------------------------------------------------------------------------------ index
@dataclass
class Span:
    """One sample in tar order: its members' (offset, size) and the bytes [start, end) that hold them all."""

    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)
    bad: Optional[BadRecord] = None  # a member that cannot be read (a link, a device): the sample is bad
    vote: Optional[str] = None  # its embedding signature (JSON) when it would be a valid record
    scratch: dict[str, Any] = field(default_factory=dict, repr=False)  # while the scan is on this sample

    @property
    def start(self) -> int:
        return min((o for o, _ in self.members.values()), default=0)

    @property
    def end(self) -> int:
        return max((o + n for o, n in self.members.values()), default=0)

    def cut(self, raw: bytes) -> dict[str, bytes]:
        """This sample's members from the bytes [start, end)."""
        s = self.start
        return {ext: raw[o - s:o - s + n] for ext, (o, n) in self.members.items()}


@dataclass
class ShardIndex:
    source: Any  # open: the reader fetches samples from it, then closes it
    spans: list[Span]
    unnamed: list[BadRecord]  # members that belong to no sample (reported once, at the shard's first visit)

    def close(self) -> None:
        self.source.close()


def scan(url: str, shard: str, options: Any) -> ShardIndex:
    """Index `url` (see the module docstring). Raises ShardUnreadable for an archive that is not a tar, is
    truncated, or is corrupt mid-way; storage errors propagate for the caller's retry policy."""
    src = open_source(url)
    try:
        spans, bad = walk(src, shard, options)
    except BaseException:
        src.close()
        raise
    keys = {s.key for s in spans}
    return ShardIndex(src, spans, [b for b in bad if b.key not in keys])


def walk(src: Any, shard: str, options: Any = None) -> tuple[list[Span], list[BadRecord]]:
    """Spans in tar order and every bad member (of a sample or of none). `options` (ReadOptions): also the
    samples' schema votes."""
    size = src.size()
    view = _View(src, size)
    spans: list[Span] = []
    bad: dict[str, BadRecord] = {}
    end, last = 0, None
    try:
        tar = tarfile.open(fileobj=view, mode="r:")
    except tarfile.TarError as e:
        raise ShardUnreadable(f"not a tar archive: {e}") from None
    try:
        for member in tar:
            last, end = member, member.offset_data + ((member.size + 511) // 512) * 512
            try:
                key, ext = split_member_name(member.name)
            except ValueError as e:
                if member.isfile():  # an unnamed regular file cannot belong to any sample
                    bad.setdefault(member.name, BadRecord(shard, member.name, "unreadable_member", str(e)))
                continue
            if not spans or spans[-1].key != key:
                if spans and options is not None:
                    _vote(spans[-1], shard, options)
                spans.append(Span(key))
            if not member.isfile():
                bad.setdefault(key, BadRecord(shard, key, "unreadable_member",
                                              f"{member.name}: not a regular file (type {member.type!r})"))
                continue
            spans[-1].members[ext] = (member.offset_data, member.size)
            if options is not None:  # what the schema vote needs, read while its block is at hand
                _gather(spans[-1], ext, view, member.offset_data, member.size)
    except tarfile.TarError as e:
        if last is not None and end > size:
            raise ShardUnreadable(_cut(last, size)) from None
        raise ShardUnreadable(f"corrupt tar: {e}") from None
    if last is not None and end > size:
        raise ShardUnreadable(_cut(last, size))
    if size - end < 1024 or not _zeros(src, end, size):
        raise ShardUnreadable(f"truncated or corrupt after byte {end} of {size} (no end-of-archive marker)")
    if spans and options is not None:
        _vote(spans[-1], shard, options)
    for span in spans:
        span.bad = bad.get(span.key)
        if span.bad is not None:
            span.vote = None
    return spans, list(bad.values())


def _cut(member: tarfile.TarInfo, size: int) -> str:
    return (f"truncated: the archive ends at byte {size}, in member {member.name} ({member.size} bytes from byte "
            f"{member.offset_data}, with its padding to 512)")


def _zeros(src: Any, start: int, end: int) -> bool:
    for at in range(start, end, TAIL_CHUNK):
        chunk = src.read(at, min(at + TAIL_CHUNK, end))
        if len(chunk) != min(TAIL_CHUNK, end - at) or chunk.count(0) != len(chunk):
            return False
    return True


# ------------------------------------------------------------------------------------ signature votes
def _gather(span: Span, ext: str, view: _View, offset: int, size: int) -> None:
    """Keep what `_vote` needs from this member: the prompt and metadata bytes, the embeddings' shapes."""
    if ext in ("txt", "json"):
        span.scratch[ext] = view.pread(offset, size)
    elif is_embedding_member(ext) and span.scratch.get("sig") is not False:
        try:
            span.scratch.setdefault("sig", {}).update(_member_signature(ext, view, offset, size))
        except Exception:  # noqa: BLE001 - unreadable embeddings: a bad record when read, no vote
            span.scratch["sig"] = False


def _vote(span: Span, shard: str, options: Any) -> None:
    """The sample's embedding signature (JSON) if it would be a valid record with embeddings, else None."""
    from data_pipeline.compact import vote_key

    scratch, span.scratch = span.scratch, {}
    sig = scratch.get("sig")
    if not sig or (options.pre_encoded and not set(sig) - {LATENT_KEY}):
        return  # a prompt-only sample (most shards): nothing to vote on
    text = {ext: scratch[ext] for ext in ("txt", "json") if ext in scratch}
    record, _ = validate_sample(span.key, text, shard, options.max_prompt_chars, options.overlong)
    if record is not None:
        span.vote = vote_key(dict(sorted(sig.items())))


def _member_signature(ext: str, view: _View, offset: int, size: int) -> dict[str, list[int]]:
    from data_pipeline.compact import signature
    from data_pipeline.encoding.packing import MARKER, SCALE_SUFFIX

    if ext.endswith(".safetensors") or ext == "safetensors":
        (n,) = struct.unpack("<Q", view.pread(offset, 8))
        if n > size - 8:
            raise ValueError("safetensors header longer than the member")
        header = json.loads(view.pread(offset + 8, n))
        return {k: [len(v["shape"]), *v["shape"][1:]] for k, v in header.items()
                if k not in ("__metadata__", MARKER) and not k.endswith(SCALE_SUFFIX)}
    name = ext.rsplit(".", 1)[0] if "." in ext else "emb"
    if ext.endswith(".npy") or ext == "npy":
        import numpy as np

        lead = view.pread(offset, 12)  # magic, version, header length (2 bytes in v1, 4 after)
        n = struct.unpack("<H", lead[8:10])[0] + 10 if lead[6:7] == b"\x01" else struct.unpack("<I", lead[8:12])[0] + 12
        f = io.BytesIO(view.pread(offset, min(size, n)))
        version = np.lib.format.read_magic(f)
        shape, _, _ = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                       else np.lib.format.read_array_header_2_0(f))
        return {name: [len(shape), *shape[1:]]}
    from data_pipeline.records import load_embeddings

    return signature(load_embeddings({ext: view.pread(offset, size)}) or {})
