"""Per-sample random streams for pi-ID: every random draw of a sample (query times, GM component dropout)
comes from its own generator, keyed by (seed, global sample index), the way its source noise is.

A batch split over W ranks then draws, for every sample, exactly the numbers a 1-rank run draws for it: a
W-rank run is the same computation as a 1-rank run (up to float summation order), and a run resumed on
another number of ranks continues it. The draws of one sample come in a fixed order (dropout of segment 0,
gaps of segment 0, dropout of segment 1, ...), so the stream needs no state beyond its key.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def sample_key(seed: int, index: int, stream: str = "piid") -> int:
    """A 63-bit generator seed for (stream, seed, global sample index); distinct from the noise's key."""
    digest = hashlib.sha256(f"{stream}/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SampleRNG:
    """B independent CPU generators, one per sample of the (local) batch, in batch order."""

    def __init__(self, seed: int, indices: Sequence[int], stream: str = "piid"):
        self.indices = [int(i) for i in indices]
        self.generators = [torch.Generator().manual_seed(sample_key(seed, i, stream)) for i in self.indices]

    def __len__(self) -> int:
        return len(self.generators)

    def __getitem__(self, rows: slice) -> "SampleRNG":
        """The streams of a micro-batch's rows: the same generator objects, so each sample keeps drawing from its
        own stream whichever micro-batch it runs in (a split step draws what the unsplit step draws)."""
        part = SampleRNG.__new__(SampleRNG)
        part.indices, part.generators = self.indices[rows], self.generators[rows]
        return part

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """(B, *shape) uniform [0, 1): row b from sample b's stream."""
        if not self.generators:
            return torch.empty((0, *shape), dtype=dtype, device=device)
        rows = [torch.rand(shape, generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device) if device is not None else torch.stack(rows)


def uniform(generator, batch_size: int, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """(B, *shape) uniforms from a `SampleRNG` (per sample) or a plain torch.Generator / None (one batch draw)."""
    if isinstance(generator, SampleRNG):
        if len(generator) != batch_size:
            raise ValueError(f"SampleRNG has {len(generator)} streams for a batch of {batch_size}")
        return generator.rand(*shape, dtype=dtype, device=device)
    gen_device = generator.device if generator is not None else device
    return torch.rand((batch_size, *shape), generator=generator, device=gen_device, dtype=dtype).to(device)
