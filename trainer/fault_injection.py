"""Fault injection for soaks and tests: a teacher client that answers NaN at chosen training steps.

Enabled only by the environment variable `PIFLOW_INJECT_NAN_TEACHER_STEPS` (e.g. `13,14`: 1-based optimiser
steps, as in metrics.jsonl), read on each rank by trainer/rank_program.py (cluster/student_group.py forwards
the driver's value to the ranks, which may run on other nodes). Keyed by the STEP, not by the request or the
attempt: a restarted or resumed run poisons the same steps again, so an uninterrupted reference run and a
chaos run skip the same steps by the same rule (the loop's non-finite guard). The first sample of each
teacher answer of a listed step is set to NaN, on every rank; every path the loop calls the teacher by
(a plain call, data-based pi-ID, the overlapped `submit(...).result()` of a remote teacher) goes through here.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

ENV = "PIFLOW_INJECT_NAN_TEACHER_STEPS"


def nan_steps_from_env() -> frozenset[int]:
    """The steps listed in PIFLOW_INJECT_NAN_TEACHER_STEPS (empty when unset)."""
    text = os.environ.get(ENV, "").strip()
    try:
        steps = frozenset(int(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise ValueError(f"{ENV}={text!r}: expected comma-separated step numbers, e.g. 13,14") from None
    if any(s < 1 for s in steps):
        raise ValueError(f"{ENV}={text!r}: steps are 1-based (the first optimiser step is 1)")
    return steps


def with_injected_faults(teacher: Any) -> Any:
    """`teacher` wrapped by `NaNTeacher` when PIFLOW_INJECT_NAN_TEACHER_STEPS is set, else `teacher` itself."""
    steps = nan_steps_from_env()
    return NaNTeacher(teacher, steps) if steps else teacher


def _poisoned(u: torch.Tensor) -> torch.Tensor:
    u = u.clone()
    u[0] = float("nan")  # the first sample's velocity (every query of it in a batched request's first row)
    return u


class _PoisonedFuture:
    def __init__(self, future: Any):
        self.future = future

    def result(self) -> torch.Tensor:
        return _poisoned(self.future.result())


class NaNTeacher:
    """teacher(x (N,C,H,W), sigma (N,), cond) -> u, with u[0] = NaN during the steps in `steps`. The loop
    announces each step through `at_step(step)`. Has `submit` exactly when the wrapped teacher has it (the
    overlapped iteration tells remote and local teachers apart that way)."""

    def __init__(self, teacher: Any, steps: frozenset[int]):
        self.teacher, self.steps = teacher, steps
        self._poison = False
        if hasattr(teacher, "submit"):
            self.submit = self._submit

    def at_step(self, step: int) -> None:
        self._poison = step in self.steps

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Optional[dict]) -> torch.Tensor:
        u = self.teacher(x, sigma, cond)
        return _poisoned(u) if self._poison else u

    def _submit(self, x: torch.Tensor, sigma: torch.Tensor, cond: Optional[dict]) -> Any:
        future = self.teacher.submit(x, sigma, cond)
        return _PoisonedFuture(future) if self._poison else future
