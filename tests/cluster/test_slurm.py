"""The SLURM template under a real SLURM (issue 11, tier `slurm`): munge, slurmctld and one slurmd on localhost
with a generated slurm.conf (every port free-picked, every file under a temp dir), `piflow template slurm` of
the tiny FLUX config submitted with `sbatch`; the script brings up Ray on the allocated node and submits the
run through the Jobs API; it trains to completion with run.output on the moto S3 server on loopback, and no
shared filesystem is involved (the run's files are all on S3; the checkout is uploaded by `piflow submit`).

One node: two `slurmd -N NAME` daemons do start on one host with SLURM 22.05, but the template's Ray nodes
would then share one host's default Ray temp dir and fixed agent ports, which PIFLOW_RAY_START_ARGS (one
value for every node) cannot vary per node. Skipped, with the reason, where the SLURM packages are absent
(`.ci/run` installs them with apt-get when it can)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from data_pipeline import storage
from tests.cluster.loopback_ray import _node_ports, free_ports
from trainer.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "flux_dev_gm_k8_4nfe.yaml"  # with the rehearsal's shrink (tests/recipes.py)
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]


def _missing() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


SLURM_CONF = """ClusterName=piflowtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
SlurmUser={user}
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=n1 Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm():
    missing = _missing()
    if missing:
        pytest.skip(f"SLURM is not installed here (missing: {', '.join(missing)}); "
                    f"apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        pytest.skip("a local slurmd must run as root (it launches jobs as their user)")
    root = Path(tempfile.mkdtemp(prefix="pfslurm-", dir="/tmp"))
    for d in ("state", "spool"):
        (root / d).mkdir()
    (root / "munge.key").write_bytes(os.urandom(1024))
    os.chmod(root / "munge.key", 0o600)
    ctld_port, slurmd_port = free_ports(2)
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=socket.gethostname(), ctld_port=ctld_port, slurmd_port=slurmd_port,
                                      root=root, user="root"))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pids: list[Path] = []
    try:
        subprocess.run([_tool("munged"), "--force", f"--key-file={root}/munge.key", f"--socket={root}/munge.sock",
                        f"--pid-file={root}/munged.pid", f"--seed-file={root}/munge.seed",
                        f"--log-file={root}/munged.log"], check=True, env=env)
        pids.append(root / "munged.pid")
        subprocess.run([_tool("slurmctld"), "-f", str(conf), "-i"], check=True, env=env)
        pids.append(root / "slurmctld.pid")
        time.sleep(1)
        subprocess.run([_tool("slurmd"), "-f", str(conf), "-N", "n1"], check=True, env=env)
        pids.append(root / "slurmd-n1.pid")
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run([_tool("sinfo"), "-h", "-o", "%T"], env=env, capture_output=True,
                                           text=True).stdout:
            assert time.monotonic() < deadline, (root / "slurmctld.log").read_text()[-3000:]
            time.sleep(1)
        yield root, env
    finally:
        for pid_file in reversed(pids):  # only the daemons this fixture started, by their pid files
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(1)
        shutil.rmtree(root, ignore_errors=True)


def test_rendered_sbatch_trains_the_recipe_to_s3(slurm, s3_server, tmp_path):
    from tests.recipes import recipe_overrides

    root, env = slurm
    bucket = f"slurm-{uuid.uuid4().hex[:10]}"
    storage.makedirs(f"s3://{bucket}")
    out = f"s3://{bucket}/runs/tiny"
    gcs, dash, client = free_ports(3)
    ray_tmp = tempfile.mkdtemp(prefix="pfsr-", dir="/tmp")  # short: Ray's socket paths are limited to 107 bytes
    script = tmp_path / "run.sbatch"
    render = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "template", "slurm", str(RECIPE), "--nodes", "1", "--cpus-per-node", "2",
         "--mem-per-node", "900M", "--time", "00:15:00", "--workdir", str(ROOT), "--gcs-port", str(gcs),
         "--dashboard-port", str(dash),
         *recipe_overrides("flux", "train.iters=2", "train.ckpt_every=2", "eval.every=0",
                           "cluster.student.max_failures=0", f"run.scratch={tmp_path / 'scratch'}", output=out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert render.returncode == 0, render.stderr
    script.write_text(render.stdout.replace("#SBATCH --output=%x-%j.out", f"#SBATCH --output={tmp_path}/job-%j.out"))
    job_env = {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               # this host's own Ray ports and temp dir (other Ray clusters may run on the machine)
               "PIFLOW_RAY_START_ARGS": " ".join([f"--ray-client-server-port={client}",
                                                  f"--temp-dir={ray_tmp}", *_node_ports()])}
    job_env = {k: v for k, v in job_env.items() if not k.startswith("RAY_ADDRESS")}
    sub = subprocess.run([_tool("sbatch"), "--parsable", str(script)], cwd=tmp_path, env=job_env,
                         capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 780
    try:
        while subprocess.run([_tool("squeue"), "-h", "-j", job], env=env, capture_output=True,
                             text=True).stdout.strip():
            assert time.monotonic() < deadline, "the SLURM job did not finish"
            time.sleep(2)
    finally:
        subprocess.run([_tool("scancel"), job], env=env, capture_output=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = (tmp_path / f"job-{job}.out").read_text()
    assert f"piflow: job flux-dev-gm-k8-4nfe-{job} SUCCEEDED" in log, log[-6000:]
    assert "piflow: startup ray_nodes_up" in log
    assert [r["step"] for r in read_metrics(storage.join(out, "metrics.jsonl"))] == [1, 2]
    assert storage.exists(storage.join(out, "config.yaml"))
    assert storage.exists(storage.join(out, "checkpoints", "step_00000002", "MANIFEST.json"))
