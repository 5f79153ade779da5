"""Read-ahead bounded in bytes (issue 22): the pieces of shard visits a reader thread produces wait in a
queue whose bytes stay under a budget, whatever the shard size.

Before it reads the next piece, the thread waits while the queue's bytes plus one more piece would pass
`max_bytes` (or `max_pieces` are queued, or the process's own memory is above `rss_limit`), unless the queue is
empty: it always makes progress, one piece at a time. A slow consumer therefore holds the reader back
(`held_s` counts the seconds) instead of letting it grow. `stats()` is what the metrics show per reader.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from typing import Any, Callable, Iterator, Optional

GIB = 1 << 30
MIN_PIECE_BYTES = 1 << 20


def process_memory() -> tuple[int, int]:
    """(resident bytes, of which private: heap and anonymous maps) of this process; (0, 0) off Linux."""
    try:
        with open("/proc/self/statm") as f:
            _, resident, shared, *_ = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        return 0, 0
    page = os.sysconf("SC_PAGE_SIZE")
    return resident * page, (resident - shared) * page


def budget(max_memory_gb: float, baseline: int, piece_max: int) -> tuple[int, int]:
    """(read-ahead bytes, bytes per piece) for a reader whose process may hold `max_memory_gb` and holds
    `baseline` already: four pieces fit in what is left (at least one piece of 1 MiB)."""
    ahead = int(max_memory_gb * GIB) - baseline
    piece = max(MIN_PIECE_BYTES, min(piece_max, ahead // 4))
    return max(ahead, piece), piece


class ReadFailed(RuntimeError):
    """The reader thread raised; `cause` is its exception (handed to the consumer at its position)."""

    def __init__(self, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


class ReadAhead:
    """`pieces` (ShardResults) read on a thread into a queue held under `max_bytes` / `max_pieces`;
    `transform` runs on each piece on the thread before it is queued (a DataWorker puts payloads in Ray's
    object store there). `rss_limit` (bytes, 0 = off): also wait while this process's private memory is above."""

    def __init__(self, pieces: Iterator[Any], max_bytes: int, piece_bytes: int, max_pieces: int, name: str,
                 transform: Optional[Callable[[Any], Any]] = None, rss_limit: int = 0):
        self.max_bytes, self.piece_bytes, self.max_pieces = max_bytes, piece_bytes, max(1, max_pieces)
        self.rss_limit, self.transform = rss_limit, transform
        self._pieces = pieces
        self._queue: collections.deque = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._failure: Optional[BaseException] = None
        self._done = False
        self.held_s = 0.0  # time the reader waited for room
        self.read = {"pieces": 0, "samples": 0, "bytes": 0}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------------- reader
    def _room(self) -> bool:
        if not self._queue:
            return True
        if len(self._queue) >= self.max_pieces or self._bytes + self.piece_bytes > self.max_bytes:
            return False
        return not self.rss_limit or process_memory()[1] <= self.rss_limit

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._cond:
                    while not self._stop.is_set() and not self._room():
                        t0 = time.monotonic()
                        self._cond.wait(0.1)
                        self.held_s += time.monotonic() - t0
                if self._stop.is_set():
                    return
                piece = next(self._pieces, None)
                if piece is None:
                    return
                if self.transform is not None:
                    piece = self.transform(piece)
                size = piece.nbytes
                with self._cond:
                    self._queue.append((piece, size))
                    self._bytes += size
                    self.read["pieces"] += 1
                    self.read["samples"] += sum(p >= 0 for p, _ in piece.items)
                    self.read["bytes"] += size
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer by get()
            self._failure = e
        finally:
            close = getattr(self._pieces, "close", None)
            if close is not None:
                try:
                    close()  # a generator: its open shard is closed here, on its own thread
                except Exception:  # noqa: BLE001
                    pass
            with self._cond:
                self._done = True
                self._cond.notify_all()

    # --------------------------------------------------------------------------------------- consumer
    def get(self, timeout: Optional[float] = None) -> Any:
        """The next piece; raises ReadFailed when the reader failed at this position, TimeoutError when none
        arrived within `timeout`, StopIteration when the reader finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._queue:
                if self._failure is not None:
                    raise ReadFailed(self._failure)
                if self._done:
                    raise StopIteration
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError
                self._cond.wait(left if left is not None else 0.5)
            piece, size = self._queue.popleft()
            self._bytes -= size
            self._cond.notify_all()
            return piece

    def stop(self, join_s: float = 30.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=join_s)
        with self._cond:
            self._queue.clear()
            self._bytes = 0

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict[str, float]:
        with self._cond:
            queued = len(self._queue)
            samples = sum(sum(p >= 0 for p, _ in piece.items) for piece, _ in self._queue)
            held = self._bytes
        rss, private = process_memory()
        return {"queued_pieces": float(queued), "queued_samples": float(samples), "readahead_mb": held / 2**20,
                "readahead_cap_mb": self.max_bytes / 2**20, "held_s": self.held_s, "rss_gb": rss / GIB,
                "private_gb": private / GIB, "read_samples": float(self.read["samples"]),
                "read_mb": self.read["bytes"] / 2**20}
