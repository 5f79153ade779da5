"""Startup timing per phase (Ray up, teacher load, student init, first step), printed as each phase ends so
a slow start shows where it stalls, and summarised at the end of the run. No ray here: the launcher
(cluster/launch.py) times the Ray and teacher phases, each student rank (trainer/rank_program.py) its own.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional, TextIO

PHASES = ("ray_up", "teacher_load", "student_init", "first_step")  # the order they happen in


class PhaseTimes:
    """Seconds per startup phase; `print_each` writes one `piflow: startup <phase> <s> s` line per phase."""

    def __init__(self, print_each: bool = True, out: Optional[TextIO] = None):
        self.seconds: dict[str, float] = {}
        self.print_each = print_each
        self.out = out

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = float(seconds)
        if self.print_each:
            print(f"piflow: startup {name} {seconds:.2f} s", file=self.out or sys.stdout, flush=True)

    def merge_max(self, per_rank: list[dict[str, float]]) -> None:
        """Fold in the ranks' phases; the slowest rank is the one everybody waits for."""
        for name in {k for r in per_rank for k in r}:
            self.seconds[name] = max(float(r[name]) for r in per_rank if name in r)

    def format(self) -> str:
        names = [p for p in PHASES if p in self.seconds] + [p for p in self.seconds if p not in PHASES]
        parts = [f"{n} {self.seconds[n]:.2f} s" for n in names]
        return "startup: " + " | ".join(parts) + f" (total {sum(self.seconds.values()):.2f} s)"


class FirstStepClock:
    """Wraps a batch iterator: the second `next()` marks the end of the first training step (the loop asks
    for step 2's batch right after step 1's optimizer step). Other attributes (state_dict, ...) pass through."""

    def __init__(self, batches: Any, times: PhaseTimes, name: str = "first_step"):
        self._batches, self._times, self._name = batches, times, name
        self._calls = 0
        self._t0 = time.perf_counter()

    def __iter__(self) -> "FirstStepClock":
        return self

    def __next__(self) -> Any:
        self._calls += 1
        if self._calls == 2:
            self.finish()
        return next(self._batches)

    def finish(self) -> None:
        """Record the phase now if it is not recorded yet (a one-step run never asks for a second batch)."""
        if self._name not in self._times.seconds and self._calls >= 1:
            self._times.add(self._name, time.perf_counter() - self._t0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batches, name)
