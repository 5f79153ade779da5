"""Startup phase timing: one line per phase as it ends, the slowest rank in the summary, and the first step
marked by the loop asking for its second batch."""
from __future__ import annotations

import io
import time

import pytest

from trainer.metrics import FirstStepClock, PhaseTimes


def test_phases_print_as_they_end_and_format_in_startup_order():
    out = io.StringIO()
    times = PhaseTimes(out=out)
    times.add("teacher_load", 2.0)
    with times.phase("ray_up"):
        time.sleep(0.01)
    lines = out.getvalue().splitlines()
    assert lines[0] == "piflow: startup teacher_load 2.00 s" and lines[1].startswith("piflow: startup ray_up ")
    assert times.seconds["ray_up"] >= 0.01
    times.seconds["ray_up"] = 1.0
    times.merge_max([{"student_init": 3.0, "first_step": 0.5}, {"student_init": 4.0, "first_step": 0.25}])
    assert times.format() == ("startup: ray_up 1.00 s | teacher_load 2.00 s | student_init 4.00 s | "
                              "first_step 0.50 s (total 7.50 s)")


def test_silent_ranks_still_record():
    out = io.StringIO()
    times = PhaseTimes(print_each=False, out=out)
    times.add("student_init", 1.5)
    assert out.getvalue() == "" and times.seconds == {"student_init": 1.5}


class _Batches:
    def __init__(self):
        self.n = 0

    def __next__(self):
        self.n += 1
        return self.n

    def state_dict(self):
        return {"n": self.n}


def test_first_step_ends_at_the_second_batch_and_attributes_pass_through():
    times = PhaseTimes(print_each=False)
    clock = FirstStepClock(_Batches(), times)
    assert next(clock) == 1 and "first_step" not in times.seconds
    time.sleep(0.01)
    assert next(clock) == 2
    first = times.seconds["first_step"]
    assert first >= 0.01
    next(clock)
    clock.finish()
    assert times.seconds["first_step"] == first  # recorded once
    assert clock.state_dict() == {"n": 3}


@pytest.mark.parametrize("calls, recorded", [(0, False), (1, True)])
def test_finish_covers_a_one_step_run(calls, recorded):
    times = PhaseTimes(print_each=False)
    clock = FirstStepClock(_Batches(), times)
    for _ in range(calls):
        next(clock)
    clock.finish()
    assert ("first_step" in times.seconds) == recorded
