"""Multi-node on loopback: a `ray start --head` node and a second `ray start --address` node on this machine,
each advertising one unit of a custom resource that every student rank needs, so the two ranks MUST land on
different nodes. A run submitted with `piflow submit` (the FLUX recipe with the rehearsal's shrink: its tiny
same-family model, LoRA + GM head, DeepSpeed ZeRO-3 over gloo under Ray Train) trains, reports where each rank ran, and finishes; the job's startup timing lines are
streamed back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.cluster.loopback_ray import LoopbackCluster
from tests.recipes import recipe_overrides, recipe_path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = recipe_path("flux")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(600)]


def tiny_distributed(out: Path, iters: int = 4) -> list[str]:
    """The FLUX recipe under DeepSpeed on 2 ranks (the rehearsal's shrink; the teacher weights from its tiny
    model's directory: distributed ranks partition a weights file, they never build a random trunk each)."""
    return recipe_overrides("flux", "cluster.student.custom_resource=student_slot", "cluster.student.max_failures=0",
                            f"train.iters={iters}", "train.ckpt_every=2", "train.log_every=1", "eval.every=0",
                            "distill.total_substeps=16", "distill.num_intermediate=2", output=str(out))


def alive_node_ids(cluster: LoopbackCluster) -> set[str]:
    req = urllib.request.Request(f"{cluster.dashboard_url}/nodes?view=summary",
                                 headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        summary = json.loads(r.read())["data"]["summary"]
    return {s["raylet"]["nodeId"] for s in summary if s["raylet"]["state"] == "ALIVE"}


@pytest.fixture(scope="module")
def two_nodes():
    cluster = LoopbackCluster(num_cpus=2, resources={"student_slot": 1})
    try:
        cluster.start()
        cluster.add_node(num_cpus=2, resources={"student_slot": 1})
        yield cluster
    finally:
        cluster.stop()


def test_two_ranks_on_two_nodes_train_checkpoint_and_finish(two_nodes, tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"HOME": str(tmp_path), "RAY_AUTH_TOKEN": two_nodes.token})
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "submit", str(RECIPE), "--address",
                           two_nodes.dashboard_url, "--working-dir", str(ROOT), "--job-id", "two-nodes",
                           *tiny_distributed(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:] + two_nodes.logs()[-3000:]
    assert "piflow: job two-nodes SUCCEEDED" in proc.stdout

    summaries = [json.loads((out / "rank_summaries" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    nodes = [s["node_id"] for s in summaries]
    assert nodes[0] != nodes[1], nodes  # forced apart by the custom resource
    assert set(nodes) == alive_node_ids(two_nodes)
    for s in summaries:
        assert s["steps"] == 4
        assert s["full_numel"] / 2 <= s["local_numel"] <= s["full_numel"] / 2 + 100  # ZeRO-3 across nodes

    from trainer.checkpoint.store import latest_valid, list_steps, rank_dirname

    assert list_steps(str(out)) == [2, 4]  # train.ckpt_every=2, both kept (ckpt_keep_last=2)
    newest = latest_valid(str(out))
    assert newest is not None and newest.step == 4
    assert newest.manifest["world_size"] == 2  # one ZeRO shard set per rank, from both nodes
    assert {rel.split("/")[0] for rel in newest.manifest["files"]} >= {rank_dirname(0), rank_dirname(1)}

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 for r in records)
    # startup timing: each phase printed by the job, then the summary line
    for phase in ("ray_up", "teacher_load", "student_init", "first_step"):
        assert f"piflow: startup {phase} " in proc.stdout, phase
    assert "piflow: startup: ray_up" in proc.stdout
