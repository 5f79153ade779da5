"""The deterministic global sample order and its cursor (DESIGN.md §5).

Epoch e visits the shards in a permutation fixed by (seed, e); inside a shard the samples come in tar order
or in a permutation fixed by (seed, e, shard name). The global stream is the concatenation of those, epoch
after epoch; batches are cut from it whatever the number of ranks, so the order never depends on the world
size. Permutations sort by a keyed BLAKE2 hash, not a library RNG: the order stays the same across numpy /
torch / Python versions, which a resume months later relies on.

A `Cursor` (epoch, shard_pos, sample_pos) names the next raw sample to consider: position `sample_pos` in
the ordered sample list of the shard at position `shard_pos` of epoch `epoch`'s shard order.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator


def _hash64(*parts: object) -> int:
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode("utf-8"), digest_size=8, person=b"piflow-ord")
    return int.from_bytes(h.digest(), "little")


def permutation(n: int, *key: object) -> list[int]:
    """A permutation of range(n) fixed by `key` (ties between equal hashes broken by index)."""
    return sorted(range(n), key=lambda i: (_hash64(*key, i), i))


def shard_order(seed: int, epoch: int, num_shards: int, shuffle: bool = True) -> list[int]:
    """Indices into the (sorted) shard list, in the order epoch `epoch` visits them."""
    return permutation(num_shards, "shards", seed, epoch) if shuffle else list(range(num_shards))


def sample_order(seed: int, epoch: int, shard_name: str, num_samples: int, shuffle: bool = True) -> list[int]:
    """Indices into a shard's samples (tar order), in the order epoch `epoch` visits them."""
    return permutation(num_samples, "samples", seed, epoch, shard_name) if shuffle else list(range(num_samples))


def fingerprint(names: list[str]) -> str:
    """Identifies a shard list in a cursor (by names, so a moved bucket still resumes)."""
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Cursor:
    epoch: int = 0
    shard_pos: int = 0
    sample_pos: int = 0

    def next_shard(self, num_shards: int) -> "Cursor":
        if self.shard_pos + 1 < num_shards:
            return Cursor(self.epoch, self.shard_pos + 1, 0)
        return Cursor(self.epoch + 1, 0, 0)


@dataclass(frozen=True)
class ShardTask:
    """Read the shard at `shard_pos` of epoch `epoch`'s order, from ordered position `start` on."""

    index: int  # running number of this task from the stream's start cursor (round-robin key for workers)
    epoch: int
    shard_pos: int
    shard_index: int  # index into the shard list
    start: int


def tasks(start: Cursor, seed: int, num_shards: int, shuffle_shards: bool) -> Iterator[ShardTask]:
    """The endless sequence of shard visits from cursor `start` on."""
    epoch, pos, first, index = start.epoch, start.shard_pos, start.sample_pos, 0
    while True:
        order = shard_order(seed, epoch, num_shards, shuffle_shards)
        while pos < num_shards:
            yield ShardTask(index, epoch, pos, order[pos], first)
            index, pos, first = index + 1, pos + 1, 0
        epoch, pos = epoch + 1, 0
