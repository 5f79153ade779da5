"""Two nodes that share nothing but object storage (issue 11), on loopback: a `ray start --head` node and a
worker node, each with its own Ray --temp-dir, its own run.scratch
(`run.scratch: $PIFLOW_NODE_SCRATCH`, expanded on each node) and its own HF_HOME; run.output and the prompt
shards on the moto S3 server. Tiny FLUX (LoRA + GM head, shared teacher), 2 ZeRO-3 ranks forced onto the two
nodes, the data feed pinned to the head (`cluster.data_custom_resource`), a driver (`piflow train --address`).

- An uninterrupted run gives the reference losses.
- The same run again (4 steps, checkpoints every 2); once its step-2 checkpoint exists, the worker node is killed with SIGKILL (its
  `ray start`, raylet and every worker process of its session) and its scratch dir deleted; a replacement node
  with an empty scratch joins; Ray Train restarts the group, which resumes from the checkpoint on S3 and
  finishes. Per-step losses equal the reference within 1e-5; config.yaml, metrics.jsonl (every step once),
  data_keys, rollouts and the checkpoints are on S3; each rank staged only in its own node's scratch.
- `piflow export s3://run --out s3://export` and `piflow sample s3://export` run from a third process whose
  environment holds only the S3 endpoint and credentials.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from data_pipeline import storage
from tests.cluster.loopback_ray import LoopbackCluster, _kill_sessions
from tests.cluster.test_s3_output import s3_only_env
from tests.cluster.test_train_distributed import write_prompt_shards
from trainer.metrics import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
ITERS, BATCH = 4, 4


def run_config(output: str, shards: str) -> dict:
    return {
        "run": {"name": "shared_nothing", "output": output, "seed": 3, "scratch": "$PIFLOW_NODE_SCRATCH",
                "log_flush_steps": 2, "lease_heartbeat_s": 5.0},
        "model": {"family": "flux", "tiny": True, "latent_channels": 4, "latent_size": 8, "max_sequence_length": 8},
        "policy": {"num_components": 2, "logstd_inner_dim": 16},
        "lora": {"enabled": True, "rank": 4, "alpha": 4.0, "dropout": 0.0,
                 "target_modules": ["to_q", "to_k", "to_v", "proj_mlp", "ff.net.2", "ff_context.net.2"]},
        "distill": {"nfe": 2, "num_intermediate": 2, "total_substeps": 16},
        "teacher": {"placement": "shared", "guidance": {"mode": "embedded", "scale": 3.5}},
        "train": {"engine": "deepspeed", "batch_size": BATCH, "precision": "fp32", "iters": ITERS, "log_every": 1,
                  "ckpt_every": 2, "ckpt_keep_last": 3},
        "optim": {"lr": 1e-3, "warmup_iters": 2, "warmup_start_factor": 0.1, "grad_clip": 1.0,
                  "grad_clip_start": 1},
        "ema": {"start": 1},
        "data": {"shards": shards, "workers": 1, "prefetch": 2},
        "eval": {"every": 4, "nfe": 2, "num_samples": 2, "prompts": ["a red cat", "a handwritten seven"], "seed": 5},
        "cluster": {"data_cpus_per_worker": 0.0, "data_custom_resource": "data_slot",
                    "student": {"workers": 2, "cpus_per_worker": 1.0, "max_failures": 2,
                                "custom_resource": "student_slot"}},
        "wandb": {"mode": "disabled"},
    }


@pytest.fixture(scope="module")
def nodes(s3_server):
    """The head and one worker node (index 1 in `cluster.procs`), scratch and HF_HOME per node."""
    root = Path(tempfile.mkdtemp(prefix="pfs-", dir="/tmp"))
    dirs = {name: root / name for name in ("scratch0", "scratch1", "hf0", "hf1", "driver")}
    for d in dirs.values():
        d.mkdir()
    cluster = LoopbackCluster(num_cpus=2, resources={"student_slot": 1, "data_slot": 1},
                              head_env={"PIFLOW_NODE_SCRATCH": str(dirs["scratch0"]), "HF_HOME": str(dirs["hf0"])})
    try:
        cluster.start()
        worker = cluster.add_node(1, {"student_slot": 1},
                                  env={"PIFLOW_NODE_SCRATCH": str(dirs["scratch1"]), "HF_HOME": str(dirs["hf1"])})
        yield cluster, worker, dirs
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def start_driver(cluster: LoopbackCluster, dirs: dict, cfg_path: Path, log: Path) -> subprocess.Popen:
    """`piflow train --address GCS` on the head: its own scratch (the head's), no shared dir with the ranks."""
    env = cluster.env(PIFLOW_NODE_SCRATCH=str(dirs["scratch0"]), HF_HOME=str(dirs["hf0"]), TMPDIR=str(dirs["driver"]),
                      PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", "train", str(cfg_path), "--address",
                             cluster.gcs_address], cwd=str(dirs["driver"]), env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, cluster: LoopbackCluster, timeout: float = 400) -> str:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        rc = None
    finally:
        _kill_sessions([proc.pid])
    text = log.read_text()
    assert rc == 0, text[-8000:] + cluster.logs()[-3000:]
    return text


def losses(out: str) -> dict[int, float]:
    records = read_metrics(storage.join(out, "metrics.jsonl"))
    steps = [r["step"] for r in records]
    assert steps == list(range(1, ITERS + 1)), steps  # every step once, in order
    return {r["step"]: r["loss"] for r in records}


def test_worker_node_lost_mid_run_resumes_from_object_storage(nodes, tmp_path):
    cluster, worker, dirs = nodes
    bucket = f"sn-{uuid.uuid4().hex[:10]}"
    storage.makedirs(f"s3://{bucket}")
    shards = f"s3://{bucket}/prompts"
    write_prompt_shards(shards)

    ref_out = f"s3://{bucket}/runs/reference"
    ref_cfg = tmp_path / "reference.yaml"
    ref_cfg.write_text(yaml.safe_dump(run_config(ref_out, shards)))
    finish(start_driver(cluster, dirs, ref_cfg, tmp_path / "reference.log"), tmp_path / "reference.log", cluster)
    want = losses(ref_out)

    out = f"s3://{bucket}/runs/killed"
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config(out, shards)))
    log = tmp_path / "killed.log"
    driver = start_driver(cluster, dirs, cfg_path, log)
    manifest = storage.join(out, "checkpoints", "step_00000002", "MANIFEST.json")
    deadline = time.monotonic() + 400
    while not storage.exists(manifest):
        assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-6000:]
        time.sleep(0.2)
    assert not storage.exists(storage.join(out, "checkpoints", "step_00000004", "MANIFEST.json"))
    cluster.kill_node(worker)  # the worker node and everything on it, between checkpoints 2 and 4
    shutil.rmtree(dirs["scratch1"])  # its node-local disk is gone too
    # a replacement node with its own, empty scratch (as a cluster manager would bring up)
    dirs["scratch2"] = dirs["scratch1"].with_name("scratch2")
    dirs["scratch2"].mkdir()
    cluster.add_node(1, {"student_slot": 1},
                     env={"PIFLOW_NODE_SCRATCH": str(dirs["scratch2"]), "HF_HOME": str(dirs["hf1"])})
    text = finish(driver, log, cluster)
    assert "resumed from" in text and f"{out}/checkpoints/step_00000002" in text  # a restart, not a rerun

    got = losses(out)
    for step in range(1, ITERS + 1):
        assert abs(got[step] - want[step]) <= 1e-5, (step, got[step], want[step])

    # everything the run leaves is on S3
    assert yaml.safe_load(storage.get_bytes(storage.join(out, "config.yaml")))["run"]["output"] == out
    for r in (0, 1):
        steps = [rec["step"] for rec in read_metrics(storage.join(out, "data_keys", f"rank_{r}.jsonl"))]
        assert steps == list(range(1, ITERS + 1)), (r, steps)
    for step in (4,):
        assert storage.get_bytes(storage.join(out, "rollouts", f"step_{step:08d}", "preview.png"))[:4] == b"\x89PNG"
    from trainer.checkpoint.store import latest_valid

    assert latest_valid(out).step == ITERS
    summaries = [json.loads(storage.get_bytes(storage.join(out, "rank_summaries", f"rank_{r}.json"))) for r in (0, 1)]
    assert summaries[0]["node_id"] != summaries[1]["node_id"]
    # each rank staged in its own node's scratch, never in another's (rank 1 now runs on the replacement)
    assert {s["scratch"] for s in summaries} == {str(dirs["scratch0"]), str(dirs["scratch2"])}
    assert not list(dirs["driver"].glob("**/metrics.jsonl")) and not list(dirs["driver"].glob("**/*.pt"))

    # export and sample from a third process that has only the S3 credentials
    export = f"s3://{bucket}/exports/killed"
    for args in (["export", out, "--out", export],
                 ["sample", export, "--prompt", "a red cat", "--nfe", "2", "--out", str(tmp_path / "s.png")]):
        proc = subprocess.run([sys.executable, "-m", "cluster.cli", *args], env=s3_only_env(tmp_path),
                              cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert storage.exists(storage.join(export, "model_index.json"))
    latents = torch.load(tmp_path / "s.pt", weights_only=True)
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


HUB_ID = "piflow-test/tiny-flux"


def save_in_hub_cache(hf_home: Path, repo_id: str, src: Path) -> Path:
    """`src` laid out as huggingface_hub's cache holds a downloaded snapshot: hub/models--ORG--NAME/
    snapshots/<revision>/... and refs/main naming the revision (what an offline resolve reads)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(src, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return repo


RESOLVE_ON_EACH_NODE = r"""
import json, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False,
         runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "PYTHONPATH": sys.argv[2]}})

@ray.remote(num_cpus=0)
def resolve(ref):
    import os
    from trainer.config import config_from_dict
    from trainer.weights import local_model_dir
    cfg = config_from_dict({"model": {"family": "flux", "pretrained": ref}, "run": {"scratch": "$PIFLOW_NODE_SCRATCH"}})
    path = local_model_dir(ref, cfg)
    with open(os.path.join(path, "transformer", "config.json")) as f:
        return {"home": os.environ["HF_HOME"], "path": path, "class": json.load(f)["_class_name"]}

nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
out = ray.get([resolve.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(sys.argv[3])
               for n in nodes])
print("RESULT " + json.dumps(out))
"""


def test_hub_id_resolves_offline_on_each_node_into_its_own_cache(nodes, tmp_path):
    """HF_HUB_OFFLINE=1, a tiny FLUX teacher in each node's own HF_HOME cache: every node resolves the id into
    ITS cache (no node reads another's), and the architecture is readable there."""
    from tests.cluster.flux_fixtures import save_tiny_teacher

    cluster, _, dirs = nodes
    teacher = Path(save_tiny_teacher(tmp_path / "teacher"))
    for home in ("hf0", "hf1"):
        shutil.rmtree(dirs[home] / "hub", ignore_errors=True)
        save_in_hub_cache(dirs[home], HUB_ID, teacher)
    proc = subprocess.run([sys.executable, "-c", RESOLVE_ON_EACH_NODE, cluster.gcs_address, str(ROOT), HUB_ID],
                          env=cluster.env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert len(results) == 2 and {r["home"] for r in results} == {str(dirs["hf0"]), str(dirs["hf1"])}
    for r in results:
        assert r["path"].startswith(r["home"] + "/hub/models--piflow-test--tiny-flux/snapshots/")
        assert r["class"] == "FluxTransformer2DModel"
