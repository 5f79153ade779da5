"""Exact resume through the real CLI: `piflow train` on a tiny toy config is killed with SIGKILL mid-run and
restarted; every step after the resume has the loss of an uninterrupted run (the resumed run restores the
weights, optimiser, EMA, step and every RNG)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trainer.metrics import read_metrics

TINY = {
    "run": {"name": "tiny", "seed": 3},
    "model": {"family": "toy2d", "latent_channels": 2, "latent_size": 1, "hidden_dim": 16, "num_layers": 2,
              "teacher_iters": 30, "teacher_batch_size": 64, "teacher_lr": 0.002},
    "policy": {"type": "gm", "num_components": 2, "dropout": 0.05, "logstd_inner_dim": 8},
    "distill": {"nfe": 2, "final_step_scale": 1.0, "shift": 1.0, "total_substeps": 16, "num_intermediate": 2,
                "window_substeps": 0.0, "loss_scale": 3.0},
    "optim": {"lr": 0.001, "warmup_iters": 5, "grad_clip_start": 5},
    "ema": {"start": 2},
    "train": {"iters": 16, "batch_size": 8, "engine": "torch", "log_every": 0, "ckpt_every": 4,
              "ckpt_keep_last": 2},
    "eval": {"every": 0},
}


def write_config(tmp_path: Path, name: str) -> Path:
    cfg = {**TINY, "run": {**TINY["run"], "output": str(tmp_path / name)},
           "model": {**TINY["model"], "teacher_cache": str(tmp_path / "teachers")}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def piflow(*args: str, command: str = "train") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", command, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def losses_by_step(metrics: Path) -> dict[int, float]:
    out = {}
    for record in read_metrics(metrics):  # a resumed run repeats the steps after its checkpoint: last wins
        out[record["step"]] = record["loss"]
    return out


@pytest.mark.slow
def test_kill9_mid_training_then_resume_matches_uninterrupted(tmp_path):
    ref_cfg = write_config(tmp_path, "reference")
    # The teacher first: training it in the same process as the student moves the global RNG, so a run that
    # trains its teacher is not comparable with one that loads it from the cache.
    proc = piflow(str(ref_cfg), command="teacher")
    assert proc.wait(timeout=240) == 0, proc.stderr.read()
    proc = piflow(str(ref_cfg))
    assert proc.wait(timeout=240) == 0, proc.stderr.read()
    reference = losses_by_step(tmp_path / "reference" / "metrics.jsonl")
    assert sorted(reference) == list(range(1, 17))

    cfg = write_config(tmp_path, "killed")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    proc = piflow(str(cfg))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:  # kill between the checkpoints of 8 and 12
        if metrics.exists() and max(losses_by_step(metrics), default=0) >= 9:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # it was really killed mid-run, not finished
    done_before = max(losses_by_step(metrics))
    assert 9 <= done_before < 16

    again = piflow(str(cfg))  # no --force: resumes from the newest valid manifest
    assert again.wait(timeout=240) == 0, again.stderr.read()
    resumed = losses_by_step(metrics)
    assert sorted(resumed) == list(range(1, 17))
    for step in range(1, 17):
        assert abs(resumed[step] - reference[step]) <= 1e-6, (step, resumed[step], reference[step])

    forced = piflow(str(cfg), "--force")  # a fresh start on the used output: same numbers from step 1
    assert forced.wait(timeout=240) == 0, forced.stderr.read()
    assert losses_by_step(metrics) == pytest.approx(reference, abs=1e-6)
