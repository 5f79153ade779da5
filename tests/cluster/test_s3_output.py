"""run.output on object storage for the in-process entry point (issue 11): `piflow train` (train.engine: torch)
with run.output on the moto S3 server leaves config.yaml, metrics.jsonl (segments), checkpoints and the lease
there and nothing on local disk but node scratch; a second `piflow train` with more iterations resumes and
continues the same metrics stream (every step once); then `piflow export s3://run --out s3://export` and
`piflow sample s3://export` run in fresh processes whose environment holds only the S3 endpoint and
credentials."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from data_pipeline import storage
from tests.trainer.checkpoint.test_resume import TINY
from trainer.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def s3_only_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """PATH, the S3 endpoint and credentials, a scratch HOME/TMPDIR: nothing else of this machine."""
    home = tmp_path / f"home-{uuid.uuid4().hex[:6]}"
    home.mkdir()
    env = {k: os.environ[k] for k in ("PATH", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update({"HOME": str(home), "TMPDIR": str(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                "WANDB_MODE": "disabled"})
    env.update(extra)
    return env


def piflow(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_in_process_run_resume_export_and_sample_on_s3(s3_server, tmp_path):
    bucket = f"run-{uuid.uuid4().hex[:10]}"
    out = f"s3://{bucket}/runs/toy"
    scratch = tmp_path / "scratch"
    cfg = {**TINY, "run": {**TINY["run"], "output": out, "scratch": str(scratch), "log_flush_steps": 3},
           "model": {**TINY["model"], "teacher_cache": str(tmp_path / "teachers")},
           "train": {**TINY["train"], "iters": 8}}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = s3_only_env(tmp_path)
    piflow(["train", str(path)], env, cwd)
    assert [r["step"] for r in read_metrics(storage.join(out, "metrics.jsonl"))] == list(range(1, 9))
    assert yaml.safe_load(storage.get_bytes(storage.join(out, "config.yaml")))["run"]["output"] == out
    assert not storage.exists(storage.join(out, "LEASE.json"))  # released at the end
    from trainer.checkpoint.store import list_steps

    assert list_steps(out) == [4, 8]
    assert list(cwd.iterdir()) == []  # nothing written where the command ran

    piflow(["train", str(path), "train.iters=12"], env, cwd)  # resumes from step 8
    records = read_metrics(storage.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 13))  # the same stream, every step once

    export = f"s3://{bucket}/exports/toy"
    piflow(["export", out, "--out", export], s3_only_env(tmp_path), cwd)
    assert storage.exists(storage.join(export, "model_index.json"))
    png = tmp_path / "grid.png"
    piflow(["sample", export, "--num", "4", "--nfe", "2", "--out", str(png)], s3_only_env(tmp_path), cwd)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    latents = torch.load(png.with_suffix(".pt"), weights_only=True)
    assert latents.shape[0] == 4 and torch.isfinite(latents).all()
