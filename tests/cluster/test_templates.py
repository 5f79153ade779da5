"""`piflow template slurm|kuberay`: the rendered sbatch script passes `bash -n`, the RayJob manifest parses
with the keys KubeRay needs, both carry the config's resources, and bad shapes fail with a clear message."""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.cli import main
from cluster.job_templates import TemplateError, TemplateParams, fill, job_name, render

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "configs" / "flux_dev_gm_k8_4nfe.yaml")  # the recipe; GPU_RUN sizes it for these shapes
GPU_RUN = ["train.engine=deepspeed", "cluster.student.workers=4", "cluster.student.gpus_per_worker=1",
           "teacher.placement=separate", "teacher.replicas=2", "teacher.gpus_per_replica=1", "train.batch_size=8"]


def _sbatch(**kw) -> str:
    return render("slurm", TemplateParams(config=RECIPE, overrides=GPU_RUN, workdir=str(ROOT), **kw))


def test_sbatch_is_valid_bash_with_the_resources(tmp_path):
    text = _sbatch(nodes=3, gpus_per_node=2, cpus_per_node=16, partition="gpu", account="proj1", time="02:00:00")
    script = tmp_path / "run.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=3" in directives and "#SBATCH --gpus-per-node=2" in directives
    assert "#SBATCH --partition=gpu" in directives and "#SBATCH --account=proj1" in directives
    assert "#SBATCH --time=02:00:00" in directives and "#SBATCH --cpus-per-task=16" in directives
    assert "{{" not in text
    # every #SBATCH line comes before the first command (sbatch stops reading directives there)
    first_cmd = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_cmd for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))


def test_sbatch_variables_parse_back_to_the_config_and_overrides(tmp_path):
    text = _sbatch(nodes=2, gpus_per_node=4)
    script = tmp_path / "vars.sh"
    # Evaluate only the variable block (bash itself, no SLURM): what the script will pass to piflow submit.
    block = text.split("WORKDIR=", 1)[1].split('cd "$WORKDIR"', 1)[0]
    script.write_text("WORKDIR=" + block + 'printf "%s\\n" "$WORKDIR" "$CONFIG" "$NODES" "$GPUS_PER_NODE" '
                      '"${OVERRIDES[@]}"\n')
    out = subprocess.run(["bash", str(script)], check=True, capture_output=True, text=True).stdout.splitlines()
    assert out[:4] == [str(ROOT), "configs/flux_dev_gm_k8_4nfe.yaml", "2", "4"]
    assert out[4:] == GPU_RUN
    assert "RAY_AUTH_MODE=token" in text and "--dashboard-host=127.0.0.1" in text
    assert "echo $RAY_AUTH_TOKEN" not in text and "cluster.cli submit" in text


def test_rayjob_manifest_has_the_required_keys(tmp_path):
    docs = list(yaml.safe_load_all(render("kuberay", TemplateParams(
        config=RECIPE, overrides=GPU_RUN, nodes=3, gpus_per_node=2, cpus_per_node=12, mem_per_node="96Gi",
        image="registry.example/piflow:1", namespace="ml"))))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    cm, job = docs
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["namespace"] == "ml"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m cluster.cli train /etc/piflow/config.yaml")
    assert spec["shutdownAfterJobFinishes"] is True
    rc = spec["rayClusterSpec"]
    assert rc["authOptions"] == {"mode": "token"} and rc["rayVersion"].startswith("2.")
    head = rc["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] == "registry.example/piflow:1"
    limits = head["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "12", "memory": "96Gi", "nvidia.com/gpu": "2"}
    assert head["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
    (workers,) = rc["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2
    assert workers["rayStartParams"]["num-gpus"] == "2"
    # the ConfigMap holds the resolved config, overrides included
    resolved = yaml.safe_load(cm["data"]["config.yaml"])
    assert resolved["cluster"]["student"]["workers"] == 4 and resolved["teacher"]["replicas"] == 2


def test_too_few_gpus_is_refused_with_the_arithmetic():
    with pytest.raises(TemplateError, match=r"needs 6 GPUs .* provide 4"):
        _sbatch(nodes=2, gpus_per_node=2)


def test_fill_rejects_missing_and_unused_fields():
    assert fill("a {{x}} b", {"x": "1"}) == "a 1 b"
    with pytest.raises(TemplateError, match="missing values for \\['y'\\]"):
        fill("{{x}} {{y}}", {"x": "1"})
    with pytest.raises(TemplateError, match="values for no field \\['z'\\]"):
        fill("{{x}}", {"x": "1", "z": "2"})


def test_job_name_is_a_dns_label():
    assert job_name("FLUX dev / GM k8 @4nfe") == "flux-dev-gm-k8-4nfe"
    assert job_name("___") == "piflow"
    assert len(job_name("x" * 100)) <= 40


def test_cli_renders_with_overrides_after_options(tmp_path, capsys):
    assert main(["template", "slurm", RECIPE, "--nodes", "2", "--gpus-per-node", "16", "--workdir", str(ROOT),
                 "train.iters=20"]) == 0  # the recipe's 32 student GPUs
    text = capsys.readouterr().out
    assert "OVERRIDES=(train.iters=20)" in text
    assert main(["template", "kuberay", RECIPE, "--nodes", "1", "cluster.student.workers=1"]) == 2
    assert "needs 1 GPUs" in capsys.readouterr().err


def test_config_outside_the_workdir_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(Path(RECIPE).read_text())
    with pytest.raises(TemplateError, match="inside the working dir"):
        render("slurm", TemplateParams(config=str(cfg), overrides=["cluster.student.gpus_per_worker=0"],
                                       workdir=str(ROOT)))
    assert f"WORKDIR={shlex.quote(str(ROOT))}" in _sbatch(nodes=3, gpus_per_node=2)


# SLURM's `scontrol` and `srun` do not exist here: test doubles (named as such) run each step on this machine.
SRUN_DOUBLE = """#!/bin/bash
# test double for srun: drop the step options (and -w's host), run the command here
while [[ $# -gt 0 ]]; do case "$1" in -w) shift 2;; -*) shift;; *) break;; esac; done
exec "$@"
"""
SCONTROL_DOUBLE = """#!/bin/bash
# test double for `scontrol show hostnames LIST`: the allocation is this one machine
echo localhost
"""


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rendered_sbatch_runs_a_ray_head_and_the_submitted_run(tmp_path):
    """The rendered script run by bash (1 node, SLURM's commands replaced by test doubles): it starts a real
    Ray head with token auth, waits for it, submits a tiny toy run through the Jobs API and exits with the
    job's status; then its trap stops Ray."""
    import os
    import shutil
    import sys
    import tempfile

    from tests.cluster.loopback_ray import _kill_sessions, _node_ports, free_ports
    from tests.cluster.test_submit import TOY, toy_overrides

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN_DOUBLE), ("scontrol", SCONTROL_DOUBLE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    gcs, dash, client = free_ports(3)
    ray_tmp = tempfile.mkdtemp(prefix="pfs-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    script = tmp_path / "run.sbatch"
    script.write_text(render("slurm", TemplateParams(config=str(TOY), overrides=toy_overrides(tmp_path, iters=2),
                                                     workdir=str(ROOT), nodes=1, cpus_per_node=2, gcs_port=gcs,
                                                     dashboard_port=dash)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"PATH": f"{bin_dir}:{Path(sys.executable).parent}:{env['PATH']}", "SLURM_JOB_NODELIST": "localhost",
                "SLURM_JOB_ID": "4242", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
                # ports and temp dir of our own: other Ray clusters may run on this machine
                "PIFLOW_RAY_START_ARGS": " ".join([f"--ray-client-server-port={client}",
                                                   f"--temp-dir={ray_tmp}", *_node_ports()])})
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        _kill_sessions([proc.pid])
        out, _ = proc.communicate()
        pytest.fail(f"the sbatch script did not finish in 240 s:\n{out[-6000:]}")
    finally:
        _kill_sessions([proc.pid])  # whatever the script's trap did not stop
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, out[-5000:]
    assert "piflow: startup ray_nodes_up" in out
    assert "piflow: submitted job toy2d-4242" in out  # <run.name>-<SLURM job id>
    assert "piflow: job toy2d-4242 SUCCEEDED" in out
    assert "done: 2 steps" in out
    assert env["PIFLOW_RAY_START_ARGS"] and "RAY_AUTH_TOKEN=" not in out
