"""Issue 21, items 2 and 3: only infrastructure failures are retried, and a run the cluster cannot hold stops
before it starts, in one line.

- `failures.kind` on real errors: a torch shape error, a config error, a non-finite stop are deterministic; the
  error a gloo rank gets when its peer process dies (two real processes), a dead actor and a timeout are not.
- A ValueError on every rank with cluster.student.max_failures=2: one attempt (Ray Train retried it twice
  before), the first failing rank's one-line message.
- The worker-group startup wait is bounded (cluster.student.startup_timeout_s) and reported as what the cluster
  lacks (Ray Train v2 called the timeout retryable and waited forever).
- The resource preflight: `piflow train configs/digits_demo.yaml cluster.student.workers=16` on a 2-CPU Ray
  fails with one line naming the missing CPUs and the override that fits; an autoscaler's node groups (its
  cluster config in the GCS) count as capacity.
All on the session's shared local Ray (2 CPUs)."""
from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from cluster.capacity import Demand, NodeGroup, pack, shortfall
from cluster.failures import DETERMINISTIC, INFRASTRUCTURE, kind
from tests.trainer.engine_workers import flux_cfg
from trainer.config import ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------- classification
# Two gloo ranks in fresh processes (only torch imported); rank 1 dies without a word, as a SIGKILLed rank does,
# and rank 0 prints what its next collective raises.
GLOO_PEER_DIES = r"""
import datetime, json, os, socket, sys
import torch, torch.distributed as dist
port, rank = int(sys.argv[1]), int(sys.argv[2])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
t = torch.ones(4)
dist.all_reduce(t)
if rank == 1:
    os._exit(1)
try:
    dist.all_reduce(t)
except BaseException as e:
    print(json.dumps([type(e).__module__, type(e).__name__, str(e)]))
"""


@pytest.mark.slow
def test_a_peers_death_under_gloo_is_infrastructure():
    import subprocess
    import sys

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", GLOO_PEER_DIES, str(port), str(r)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env) for r in range(2)]
    try:
        out = procs[0].communicate(timeout=120)[0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    module, name, text = json.loads(out.strip().splitlines()[-1])
    assert (module, name) == ("builtins", "RuntimeError")  # a plain RuntimeError, told apart by what it says
    assert kind(RuntimeError(text)) == INFRASTRUCTURE, text


def test_deterministic_errors_are_not_infrastructure():
    from trainer.loop import NonFiniteError

    with pytest.raises(RuntimeError) as shape:
        torch.zeros(2, 3) @ torch.zeros(4, 5)  # a real shape error
    assert kind(shape.value) == DETERMINISTIC
    assert kind(ValueError("model.gradient_checkpointing: true, but the student has no block ...")) == DETERMINISTIC
    assert kind(ConfigError("c.yaml: key 'train.iters': ...")) == DETERMINISTIC
    assert kind(NonFiniteError("step 4: 2 consecutive steps with non-finite loss")) == DETERMINISTIC
    assert kind(FileNotFoundError("model.pretrained: /x/transformer does not exist")) == DETERMINISTIC
    assert kind(TimeoutError("teacher replica 0: no answer in 300 s")) == INFRASTRUCTURE
    assert kind(ConnectionResetError(104, "Connection reset by peer")) == INFRASTRUCTURE
    from botocore.exceptions import ClientError

    def s3_error(code: str, status: int) -> ClientError:  # what s3fs raises through, after storage.py's retries
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert kind(s3_error("SlowDown", 503)) == INFRASTRUCTURE  # an object-store outage
    assert kind(s3_error("AccessDenied", 403)) == DETERMINISTIC  # credentials: a restart would not help


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_errors_from_actors_are_classified_by_their_cause(ray_local):
    import ray

    @ray.remote(num_cpus=0)
    class Box:
        def bad(self):
            raise ValueError("bad embedding shape")

        def pid(self):
            return os.getpid()

    box = Box.remote()
    with pytest.raises(ray.exceptions.RayTaskError) as task_error:
        ray.get(box.bad.remote())
    assert kind(task_error.value) == DETERMINISTIC  # a ValueError raised inside an actor method
    os.kill(ray.get(box.pid.remote()), 9)  # the actor's process dies
    with pytest.raises(ray.exceptions.RayActorError) as dead:
        ray.get(box.pid.remote(), timeout=60)
    assert kind(dead.value) == INFRASTRUCTURE
    try:  # how a client reports a replica that died for good: a RuntimeError caused by the actor's death
        raise RuntimeError("teacher replica 0 died 3 times") from dead.value
    except RuntimeError as e:
        assert kind(e) == INFRASTRUCTURE


# ---------------------------------------------------------------------------------- the student group
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_deterministic_error_stops_the_group_at_once(ray_local, tmp_path):
    from cluster.student_group import StudentGroupFailed, run_student_group

    out = tmp_path / "run"
    cfg = config_from_dict(flux_cfg(2, "", run={"output": str(out)}, data={"shards": str(tmp_path / "shards")},
                                    cluster={"student": {"workers": 2, "cpus_per_worker": 1.0, "max_failures": 2}}))
    with pytest.raises(StudentGroupFailed) as err:  # data.shards set but no feed: a ValueError on every rank
        run_student_group(cfg, None, None, num_threads=1)
    message = str(err.value)
    assert "\n" not in message
    assert "ValueError: data.shards is set but the student group got no data feed" in message
    assert "not retried" in message and "deterministic" in message and "no valid checkpoint" in message
    records = [json.loads(p.read_text()) for p in (out / "failures").glob("*.json")]
    assert records and {r["kind"] for r in records} == {DETERMINISTIC}
    assert len({r["attempt"] for r in records}) == 1  # one attempt: max_failures=2 left unused


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_worker_group_start_is_bounded_and_names_what_is_missing(ray_local, tmp_path):
    """Past the preflight (called directly), 3 one-CPU ranks on 2 CPUs: Ray Train's startup times out after
    cluster.student.startup_timeout_s and the run stops with what the cluster lacks."""
    from cluster.capacity import CapacityError
    from cluster.student_group import run_student_group

    cfg = config_from_dict(flux_cfg(3, "", run={"output": str(tmp_path / "run")}, train={"batch_size": 6},
                                    cluster={"student": {"workers": 3, "cpus_per_worker": 1.0, "max_failures": 2,
                                                         "startup_timeout_s": 5.0}}))
    with pytest.raises(CapacityError) as err:
        run_student_group(cfg, None, {"prompt_embeds": [5, 32], "pooled_prompt_embeds": [32]}, num_threads=1)
    message = str(err.value)
    assert "\n" not in message
    assert "did not start in cluster.student.startup_timeout_s=5 s" in message
    assert "3 student ranks x {CPU 1}" in message and "missing CPU 1" in message
    assert "cluster.student.workers=2" in message  # 6 prompts split over 2 ranks, and 2 CPUs hold them


# ----------------------------------------------------------------------------------- resource preflight
def test_packing_is_per_node_not_per_sum():
    rank = Demand("student rank", {"GPU": 2.0, "CPU": 8.0}, 2)
    assert pack([rank], [{"GPU": 2.0, "CPU": 16.0}, {"GPU": 2.0, "CPU": 16.0}]) == []
    left = pack([rank], [{"GPU": 1.0, "CPU": 16.0}] * 4)  # 4 GPUs in sum, never 2 on one node
    assert left == [Demand("student rank", {"GPU": 2.0, "CPU": 8.0}, 2)]
    # the autoscaler's nodes count once the live ones are full
    assert pack([rank], [{"GPU": 1.0, "CPU": 16.0}], [NodeGroup({"GPU": 2.0, "CPU": 8.0}, 2)]) == []
    assert len(pack([rank], [], [NodeGroup({"GPU": 2.0, "CPU": 8.0}, 1)])) == 1


def test_fragmented_gpus_are_named_with_a_fitting_override():
    cfg = load_config(ROOT / "configs" / "flux_dev_gm_k8_4nfe.yaml",
                      ["cluster.student.workers=4", "cluster.student.gpus_per_worker=2",
                       "cluster.student.cpus_per_worker=4", "eval.every=0", "data.workers=1"])
    reason = shortfall(cfg, [{"GPU": 1.0, "CPU": 32.0}] * 8)
    assert "no node has room for 4 student ranks (each needs {GPU 2, CPU 4} on one node)" in reason
    assert "8 x {GPU 1, CPU 32}" in reason


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_sixteen_workers_on_two_cpus_fail_in_one_line(ray_local, tmp_path, capsys):
    from cluster.cli import main

    out = tmp_path / "run"
    rc = main(["train", str(ROOT / "configs" / "digits_demo.yaml"), "cluster.student.workers=16",
               f"run.output={out}", "data.shards=", "wandb.mode=disabled"])
    captured = capsys.readouterr()
    lines = [line for line in (captured.err + captured.out).splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("piflow train: the cluster cannot hold this run")
    assert "16 student ranks x {CPU 1}" in line and "missing CPU 14" in line
    assert "an override that fits: cluster.student.workers=2" in line
    assert not (out / "config.yaml").exists()  # nothing was written or started


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_the_autoscalers_node_groups_count_as_capacity(ray_local):
    """The autoscaler writes its cluster config (node groups with their max_count) into the GCS; here a test
    double of that config is written the same way (no autoscaler runs on this machine)."""
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    from cluster.capacity import CapacityError, check

    cfg = load_config(ROOT / "configs" / "digits_demo.yaml", ["cluster.student.workers=16", "data.shards="])
    ns = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    key = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode()

    def scaler(max_count: int) -> None:
        config = autoscaler_pb2.ClusterConfig()
        group = config.node_group_configs.add()
        group.name, group.min_count, group.max_count = "cpu8", 0, max_count
        group.resources["CPU"] = 8
        internal_kv._internal_kv_put(key, config.SerializeToString(), overwrite=True, namespace=ns)

    try:
        with pytest.raises(CapacityError, match="no autoscaler"):
            check(cfg)
        scaler(2)  # 2 more nodes of 8 CPUs: 2 + 16 >= 16 CPUs
        check(cfg)
        scaler(1)
        with pytest.raises(CapacityError, match=r"autoscaler: 1 x \{CPU 8\} more; missing CPU 6"):
            check(cfg)
    finally:
        internal_kv._internal_kv_del(key, namespace=ns)
