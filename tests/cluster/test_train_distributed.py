"""`piflow train` end to end on the distributed path (`train.engine: deepspeed`), through the real CLI in a
subprocess: an embedded local Ray, 2 ZeRO-3 student ranks under Ray Train (gloo), one TeacherServer actor, a
DataWorker streaming prompt shards from the loopback S3 server (moto) and encoding them with the tiny FLUX
text encoders, a local run.output. Tiny FLUX (LoRA + GM head), 6 iterations, checkpoints every 2, rollouts
every 3.

- the run trains, writes a valid checkpoint (sha256 against the manifest) and rollouts, and the sample keys
  the two ranks consumed, interleaved, are exactly the global order of an in-process `PromptStream`;
- kill -9 of the whole `piflow train` process session (driver, its local Ray, the rank workers) mid-run,
  then `piflow train` again: the losses of every step equal the uninterrupted run's within 1e-6, and the
  consumed keys are identical (no replay, no skip);
- `piflow export` of the run loads with `PiFlowPipeline.from_pretrained` and samples exactly the latents of
  the last validation rollout (same prompts, same seeds, EMA weights).
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data_pipeline import storage
from tests.data_pipeline.helpers import new_bucket, tar_bytes
from trainer.metrics import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.distributed, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
ITERS, BATCH, WORLD = 6, 4, 2
WORDS = [("red", "cat"), ("blue", "dog"), ("green", "cat"), ("small", "dog"), ("large", "cat"), ("red", "dog")]
SHARD_SIZES = [7, 5, 6]  # 18 prompts: 6 steps x 4 = 24 samples cross an epoch boundary


def tiny_config(output: Path, shards: str) -> dict:
    return {
        "run": {"name": "tiny_ds", "output": str(output), "seed": 3},
        "model": {"family": "flux", "tiny": True, "latent_channels": 4, "latent_size": 8, "max_sequence_length": 8},
        "policy": {"num_components": 2, "logstd_inner_dim": 16},
        "lora": {"enabled": True, "rank": 4, "alpha": 4.0, "dropout": 0.05,
                 "target_modules": ["to_q", "to_k", "to_v", "proj_mlp", "ff.net.2", "ff_context.net.2"]},
        "distill": {"nfe": 2, "num_intermediate": 2, "total_substeps": 16},
        "teacher": {"placement": "separate", "cpus_per_replica": 0.0, "overlap": True,
                    "guidance": {"mode": "embedded", "scale": 3.5}},
        "train": {"engine": "deepspeed", "batch_size": BATCH, "precision": "fp32", "iters": ITERS, "log_every": 1,
                  "ckpt_every": 2, "ckpt_keep_last": 3},
        "optim": {"lr": 1e-3, "warmup_iters": 2, "warmup_start_factor": 0.1, "grad_clip": 1.0,
                  "grad_clip_start": 1},
        "ema": {"start": 1},
        "data": {"shards": shards, "workers": 1, "prefetch": 2},
        "eval": {"every": 3, "nfe": 2, "num_samples": 2, "prompts": ["a red cat", "a handwritten seven"], "seed": 5},
        "cluster": {"num_cpus": 2, "data_cpus_per_worker": 0.0,
                    "student": {"workers": WORLD, "cpus_per_worker": 1.0, "max_failures": 0}},
        "wandb": {"mode": "disabled"},
    }


def write_prompt_shards(root: str) -> list[str]:
    urls, n = [], 0
    for i, size in enumerate(SHARD_SIZES):
        samples = []
        for _ in range(size):
            color, animal = WORDS[n % len(WORDS)]
            samples.append((f"p{n:04d}", {"txt": f"a {color} {animal} {n % 7}".encode()}))
            n += 1
        url = storage.join(root, f"shard-{i:06d}.tar")
        storage.put_bytes(url, tar_bytes(samples))
        urls.append(url)
    return urls


def piflow(*args: str, log: Path) -> subprocess.Popen:
    """`piflow ...` in its own process session (kill -9 takes its local Ray with it). The environment carries
    the s3_server fixture's endpoint and (fake) credentials to the run's Ray workers."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], cwd=str(ROOT), env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the session `proc` leads (it was started with start_new_session)."""
    from tests.cluster.loopback_ray import _kill_sessions

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    _kill_sessions([proc.pid])


def finish(proc: subprocess.Popen, log: Path, timeout: float = 400) -> str:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        raise AssertionError(f"piflow did not finish in {timeout}s:\n{log.read_text()[-6000:]}")
    finally:
        from tests.cluster.loopback_ray import _kill_sessions

        _kill_sessions([proc.pid])  # leftovers of its local Ray, if any
    text = log.read_text()
    assert rc == 0, text[-8000:]
    return text


def consumed_keys(out: Path) -> dict[int, list[str]]:
    """Step -> the global batch's keys as the ranks consumed them (strided layout: rank 0, rank 1, ...)."""
    per_rank = []
    for r in range(WORLD):
        steps = {}
        for rec in read_metrics(out / "data_keys" / f"rank_{r}.jsonl"):
            assert rec["step"] not in steps, f"rank {r} logged step {rec['step']} twice"
            steps[rec["step"]] = rec["keys"]
        per_rank.append(steps)
    assert per_rank[0].keys() == per_rank[1].keys()
    return {s: [k for pair in zip(*(p[s] for p in per_rank)) for k in pair] for s in per_rank[0]}


def losses(out: Path) -> dict[int, float]:
    records = read_metrics(out / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"duplicate step records: {steps}"
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def setup(s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_train")
    prefix = new_bucket() + "/prompts"
    urls = write_prompt_shards(prefix)
    return root, prefix, urls


@pytest.fixture(scope="module")
def reference_run(setup):
    """The uninterrupted run."""
    root, prefix, _ = setup
    out = root / "reference"
    cfg_path = root / "reference.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(out, prefix)))
    log = root / "reference.log"
    text = finish(piflow("train", str(cfg_path), log=log), log)
    return out, cfg_path, text


def test_two_rank_run_trains_checkpoints_rollouts_and_consumes_the_global_order(setup, reference_run):
    from data_pipeline.reader import ReadOptions
    from data_pipeline.stream import PromptStream
    from trainer.checkpoint.store import latest_valid
    from trainer.config import load_config

    _, prefix, urls = setup
    out, cfg_path, text = reference_run
    cfg = load_config(cfg_path)
    # metrics: every step once, the loss averaged over the two ranks
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, ITERS + 1))
    for r in records:
        assert np.isfinite(r["loss"]) and r["loss"] > 0 and np.isfinite(r["loss_rank0"])
        assert r["loss"] != r["loss_rank0"]  # the ranks see different prompts and noise
    # a valid checkpoint of the last step, written by both ranks, with the cursor of the consumed batches
    info = latest_valid(str(out), "sha256")
    assert info is not None and info.step == ITERS and info.manifest["world_size"] == WORLD
    for r in range(WORLD):
        for name in ("client.pt", "state.safetensors", "state.json"):
            assert f"rank_{r:05d}/{name}" in info.manifest["files"]
    client = torch.load(io.BytesIO(storage.get_bytes(storage.join(info.url, "rank_00000", "client.pt"))),
                        weights_only=True)
    assert client["step"] == ITERS and client["data"]["batches"] == ITERS and client["data"]["epoch"] == 1
    # rollouts at the eval steps
    for step in (3, 6):
        rollout = out / "rollouts" / f"step_{step:08d}"
        assert (rollout / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        meta = json.loads((rollout / "metrics.json").read_text())
        assert meta["step"] == step and meta["prompts"] == ["a red cat", "a handwritten seven"]
        assert np.isfinite(meta["metrics"]["rollout/x0_std"])
    # the consumed keys are the global order (in-process reference stream over the same S3 shards)
    ref = PromptStream(urls, BATCH, seed=cfg.run.seed, options=ReadOptions.from_config(cfg.data))
    want = [next(ref).keys for _ in range(ITERS)]
    ref.close()
    got = consumed_keys(out)
    assert [got[s] for s in range(1, ITERS + 1)] == want
    # the teacher got each rank's prompt embeddings once per batch, and one request per segment (overlap)
    summaries = [json.loads((out / "rank_summaries" / f"rank_{r}.json").read_text()) for r in range(WORLD)]
    stats = summaries[0]["teacher_stats"][0]
    assert stats["cond_puts"] == ITERS * WORLD
    assert stats["requests"] == ITERS * WORLD * cfg.distill.nfe
    for phase in ("ray_up", "teacher_load", "data_feed", "student_init", "first_step"):
        assert f"piflow: startup {phase} " in text, phase
    assert f"done: {ITERS} steps on {WORLD} ranks" in text


@pytest.mark.slow  # the commit tier resumes in tests/trainer/checkpoint/test_checkpoint.py
def test_kill9_then_resume_matches_the_uninterrupted_run(setup, reference_run):
    root, prefix, _ = setup
    ref_out, _, _ = reference_run
    out = root / "killed"
    cfg_path = root / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(out, prefix)))
    log = root / "killed.log"
    proc = piflow("train", str(cfg_path), log=log)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:  # kill after step 5 (checkpoint 4 queued)
        if metrics.exists() and max((r["step"] for r in read_metrics(metrics)), default=0) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, log.read_text()[-6000:]  # still running: a real kill mid-run
    kill_session(proc)
    killed_at = max(r["step"] for r in read_metrics(metrics))
    assert 5 <= killed_at < ITERS
    assert not (out / "checkpoints" / f"step_{ITERS:08d}" / "MANIFEST.json").exists()

    log2 = root / "resumed.log"
    text = finish(piflow("train", str(cfg_path), log=log2), log2)  # no --force: resumes
    assert "resumed from" in text
    reference, resumed = losses(ref_out), losses(out)
    assert sorted(resumed) == list(range(1, ITERS + 1))
    for step in range(1, ITERS + 1):
        assert abs(resumed[step] - reference[step]) <= 1e-6, (step, resumed[step], reference[step])
    assert consumed_keys(out) == consumed_keys(ref_out)


def test_export_loads_with_the_pipeline_and_samples_the_last_rollout(setup, reference_run):
    from models.pipeline import PiFlowPipeline
    from trainer.config import load_config

    root, _, _ = setup
    out, cfg_path, _ = reference_run
    cfg = load_config(cfg_path)
    export = root / "export"
    log = root / "export.log"
    text = finish(piflow("export", str(out), "--out", str(export), log=log), log)
    assert "exported lora flux student" in text

    pipe = PiFlowPipeline.from_pretrained(str(export))
    n = cfg.eval.num_samples
    gens = [torch.Generator().manual_seed(cfg.eval.seed + i) for i in range(n)]
    got = pipe(prompt=cfg.eval.prompts, num_inference_steps=cfg.eval.nfe, generator=gens, num_images=1)
    with tarfile.open(out / "rollouts" / f"step_{ITERS:08d}" / "latents.tar") as tar:
        want = torch.stack([torch.from_numpy(np.load(io.BytesIO(tar.extractfile(f"sample_{i:05d}.final.npy").read())))
                            for i in range(n)])
    assert got.shape == want.shape == (n, 4, 8, 8)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
