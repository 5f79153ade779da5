"""`piflow shards encode` / `piflow shards latents` as Ray jobs on a real loopback cluster (`ray start --head`):
two actors (each loads its encoder once) process shard by shard; the driver killed with SIGKILL mid-job leaves
only whole output shards; the rerun skips them and the result equals an uninterrupted encode byte for byte;
progress over prompts with an ETA on stderr."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.shards import build_shards
from tests.cluster.loopback_ray import LoopbackCluster

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]
N_SHARDS, PER_SHARD = 10, 80


@pytest.fixture(scope="module")
def cluster():
    c = LoopbackCluster(num_cpus=2)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _cli(cluster, args, **kw) -> subprocess.Popen:
    env = cluster.env(PYTHONPATH=str(ROOT), RAY_ADDRESS=cluster.gcs_address)
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _config(tmp_path: Path, cluster) -> Path:
    cfg = tmp_path / "enc.yaml"
    cfg.write_text("model:\n  family: flux\n  tiny: true\n  max_sequence_length: 32\n"
                   f"cluster:\n  address: {cluster.gcs_address}\n  data_cpus_per_worker: 1.0\n")
    return cfg


def test_encode_job_two_workers_resumes_after_kill9_byte_for_byte(tmp_path, cluster):
    from data_pipeline.encoding.job import EncodeShardWorker
    from models.families import load_text_encoder
    from trainer.config import load_config

    words = "a the red blue green cat dog small large photo painting of with in on".split()
    lines = [" ".join(words[(i * k) % len(words)] for k in range(1, 3 + i % 9)) for i in range(N_SHARDS * PER_SHARD)]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    raw = str(tmp_path / "raw")
    urls = build_shards(str(tmp_path / "p.txt"), raw, per_shard=PER_SHARD, progress=False).urls
    cfg_path = _config(tmp_path, cluster)

    # the reference: an uninterrupted encode, in this process
    worker = EncodeShardWorker(load_text_encoder(load_config(cfg_path)), "fp8")
    (tmp_path / "ref").mkdir()
    for u in urls:
        worker(u, str(tmp_path / "ref" / Path(u).name))

    out = tmp_path / "enc"
    args = ["shards", "encode", raw, "--out", str(out), "--config", str(cfg_path), "--dtype", "fp8", "--workers", "2"]
    job = _cli(cluster, args)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.poll() is None:
        if out.exists() and any(n.endswith(".tar") for n in os.listdir(out)):
            break
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGKILL)  # the driver, killed without warning
    job.communicate(timeout=60)
    done = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    assert 0 < len(done) < N_SHARDS, f"kill landed outside the job ({len(done)} shards done)"
    assert not [n for n in os.listdir(out) if not n.endswith(".tar")]  # no partial files: atomic puts

    job = _cli(cluster, args)
    stdout, stderr = job.communicate(timeout=400)
    assert job.returncode == 0, stderr[-3000:]
    assert f"{len(done)} of {N_SHARDS} output shards exist already" in stderr
    assert f"encoded {(N_SHARDS - len(done)) * PER_SHARD} prompts into {N_SHARDS - len(done)} shards" in stdout
    assert re.search(r"\d+/\d+ \[[0-9:]+<[0-9:?]+, .*prompt/s", stderr), stderr[-2000:]  # progress with an ETA
    for u in urls:
        name = Path(u).name
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_latents_job_on_two_workers_equals_in_process(tmp_path, cluster):
    from data_pipeline.latents.shards import digits_image_shards, shard_latents
    from models.vae_encoder import load_image_encoder
    from trainer.config import load_config

    urls = digits_image_shards(str(tmp_path / "img"), split="test", per_shard=60)
    cfg = tmp_path / "digits.yaml"
    cfg.write_text((ROOT / "configs" / "digits_demo.yaml").read_text().replace("address: local",
                                                                                f"address: {cluster.gcs_address}"))
    shard_latents(urls, str(tmp_path / "ref"), load_image_encoder(load_config(cfg)), flip="random", seed=1)
    job = _cli(cluster, ["shards", "latents", str(tmp_path / "img"), "--out", str(tmp_path / "lat"), "--config",
                         str(cfg), "--flip", "random", "--seed", "1", "--workers", "2", "cluster.data_cpus_per_worker=1"])
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    assert f"in {len(urls)} shards" in stdout
    for u in urls:
        name = Path(u).name
        assert (tmp_path / "lat" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
