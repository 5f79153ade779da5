"""Appending JSON-lines logs (`metrics.jsonl`, `data_keys/rank_R.jsonl`) under run.output, local or on object
storage, read back as one stream.

Object storage cannot append, so there a log is a prefix of numbered segments, `<url>/00000000.jsonl`,
`<url>/00000001.jsonl`, ...: records are buffered and one new segment is PUT every `flush_steps` steps or
`flush_s` seconds (checked as records arrive) and at every checkpoint (`flush()`, before the checkpoint is
written: the loop logs step S before it checkpoints S), so every record up to the newest checkpoint is on
storage before that checkpoint can commit. A local log stays one file, appended and flushed per record.
A resumed run (`resume_step`) first drops the records after its checkpoint (they will be logged again),
then continues the same stream with the next segment number.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

from data_pipeline import storage

SEGMENT_DIGITS = 8


def _segment_name(n: int) -> str:
    return f"{n:0{SEGMENT_DIGITS}d}.jsonl"


def segments(url: str) -> list[tuple[int, str]]:
    out = []
    for name in storage.listdir(url):
        stem = name[:-len(".jsonl")] if name.endswith(".jsonl") else ""
        if stem.isdigit():
            out.append((int(stem), storage.join(url, name)))
    return sorted(out)


def _parse(text: str, where: str, tolerate_partial_tail: bool) -> tuple[list[dict[str, Any]], int]:
    """Records of JSON-lines text; (records, bad line count). A bad line raises unless it is a partial tail."""
    records, bad = [], 0
    lines = text.splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if tolerate_partial_tail and n == len(lines):
                bad += 1
                continue
            raise ValueError(f"{where}:{n}: not a JSON record ({e})") from None
    return records, bad


def _timeline(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Apply superseding: a record whose step is below one already seen starts a resumed timeline, so the
    earlier records with a step >= its step are dropped (normally the resume already removed them)."""
    out: list[dict[str, Any]] = []
    newest = None
    for r in records:
        step = int(r.get("step", 0))
        if newest is not None and step < newest:
            out = [o for o in out if int(o.get("step", 0)) < step]
        out.append(r)
        newest = step
    return out


def read_records(url: str | Path) -> list[dict[str, Any]]:
    """Every record of a log: a local JSON-lines file, or the segments under a local dir / object-storage
    prefix, in order, as one stream. Raises FileNotFoundError when there is neither."""
    url = str(url)
    if not storage.is_s3(url) and Path(url).is_file():
        return _parse(Path(url).read_text(), url, tolerate_partial_tail=False)[0]
    found = segments(url)
    if not found:
        raise FileNotFoundError(f"{url}: no log file or segments")
    records: list[dict[str, Any]] = []
    for _, seg in found:
        records += _parse(storage.get_bytes(seg).decode("utf-8"), seg, tolerate_partial_tail=False)[0]
    return _timeline(records)


def truncate_file(path: str | Path, last_step: int) -> int:
    """Keep only the records of a local JSON-lines file with step <= `last_step`. Atomic rewrite; a partial last
    line (a killed writer) is dropped too. Returns how many records were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped


def truncate_segments(url: str, last_step: int) -> int:
    """Drop the records with step > `last_step` from the segments under `url` (rewriting or deleting the
    segments that hold them). Returns how many records were dropped."""
    dropped = 0
    for _, seg in segments(url):
        records, _ = _parse(storage.get_bytes(seg).decode("utf-8"), seg, tolerate_partial_tail=True)
        kept = [r for r in records if int(r.get("step", 0)) <= last_step]
        if len(kept) == len(records):
            continue
        dropped += len(records) - len(kept)
        if kept:
            storage.put_bytes(seg, "".join(json.dumps(r) + "\n" for r in kept).encode())
        else:
            storage.remove(seg)
    return dropped


class RecordLog:
    """One appending log at `url` (see the module docstring). `guard()` (optional) is called before every
    write to storage: the single-writer lease raises there when another run has taken the output over."""

    def __init__(self, url: str | Path, resume_step: Optional[int] = None, flush_steps: int = 20,
                 flush_s: float = 30.0, guard: Optional[Callable[[], None]] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.url = str(url)
        self.segmented = storage.is_s3(self.url)
        self.flush_steps, self.flush_s, self.guard, self.clock = flush_steps, flush_s, guard, clock
        self._buffer: list[str] = []
        self._steps: set[int] = set()
        self._file = None
        if self.segmented:
            if resume_step is not None:
                truncate_segments(self.url, resume_step)
            existing = segments(self.url)
            self._next = existing[-1][0] + 1 if existing else 0
        else:
            path = Path(self.url)
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_file(path, resume_step)
            self._file = path.open("a")
        self._last_flush = self.clock()

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
            return
        self._buffer.append(line)
        self._steps.add(int(record.get("step", 0)))
        if len(self._steps) >= self.flush_steps or self.clock() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Write the buffered records as the next segment (object storage), synchronously (storage retries
        transient errors); a no-op when nothing is buffered."""
        self._last_flush = self.clock()
        if not self._buffer:
            return
        if self.guard is not None:
            self.guard()
        storage.put_bytes(storage.join(self.url, _segment_name(self._next)), "".join(self._buffer).encode())
        self._next += 1
        self._buffer, self._steps = [], set()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        else:
            self.flush()
