"""`piflow template slurm|kuberay`: the rendered sbatch script passes `bash -n`, the RayJob manifest parses
with the keys KubeRay needs, both carry the config's resources, and bad shapes fail with a clear message.

Issue 21 (templates that run as rendered): the node shape comes from the recipe's cluster.* keys (flags
override), CPUs per node cover the ranks that land there, the SLURM head address is routable (not
`hostname --ip-address`), and the KubeRay manifest names an image built from the repository's Dockerfile, takes
credentials from a Secret, mounts a scratch volume sized from the plan and has no deadline that ends a run."""
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
           "teacher.placement=separate", "teacher.replicas=2", "teacher.gpus_per_replica=1", "train.batch_size=8",
           "cluster.student.cpus_per_worker=4", "data.workers=2"]


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
    assert "activeDeadlineSeconds" not in str(docs)  # nothing ends a long run
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    cm, job = docs
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["namespace"] == "ml"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("piflow train /etc/piflow/config.yaml")  # installed in the image
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
    with pytest.raises(TemplateError, match=r"4 student ranks x \{GPU 1, CPU 4\} \+ 2 teacher replicas x "
                                            r"\{GPU 1, CPU 1\}.*missing GPU 2; an override that fits: "):
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
    assert main(["template", "kuberay", RECIPE, "--nodes", "1", "--gpus-per-node", "0", "--image", "r/p:1",
                 "--mem-per-node", "8G", "cluster.student.workers=1", "cluster.student.gpus_per_worker=1"]) == 2
    assert "missing GPU" in capsys.readouterr().err
    assert main(["template", "kuberay", RECIPE, "--nodes", "2"]) == 2  # the recipe's shape, but no image
    assert "--image is required" in capsys.readouterr().err


def test_config_outside_the_workdir_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(Path(RECIPE).read_text())
    with pytest.raises(TemplateError, match="inside the working dir"):
        render("slurm", TemplateParams(config=str(cfg), overrides=["cluster.student.gpus_per_worker=0"],
                                       workdir=str(ROOT)))
    assert f"WORKDIR={shlex.quote(str(ROOT))}" in _sbatch(nodes=3, gpus_per_node=2)


# ---------------------------------------------------------------------------------- issue 21: shapes
FLUX = str(ROOT / "configs" / "flux_dev_gm_k8_4nfe.yaml")
# 2 nodes x 8 GPUs, 8 CPUs per rank, the recipe's node shape cleared (as in a recipe that states none)
FLUX_16 = ["cluster.student.workers=16", "eval.validation_gpus=0", "cluster.cpus_per_node=0",
           "cluster.memory_gb_per_node=0"]
SHAPE = ["cluster.nodes=2", "cluster.gpus_per_node=8", "cluster.cpus_per_node=96", "cluster.memory_gb_per_node=1000"]


def _directives(text: str) -> dict[str, str]:
    return dict(line[len("#SBATCH --"):].split("=", 1) for line in text.splitlines() if line.startswith("#SBATCH --"))


def test_the_node_shape_comes_from_the_recipe_and_flags_override_it():
    d = _directives(render("slurm", TemplateParams(config=FLUX, overrides=[*FLUX_16, *SHAPE], workdir=str(ROOT))))
    assert (d["nodes"], d["gpus-per-node"], d["cpus-per-task"], d["mem"]) == ("2", "8", "96", "1000G")
    d = _directives(render("slurm", TemplateParams(config=FLUX, overrides=[*FLUX_16, *SHAPE], workdir=str(ROOT),
                                                   cpus_per_node=112, mem_per_node="1500G")))
    assert (d["cpus-per-task"], d["mem"]) == ("112", "1500G")


def test_without_a_recipe_shape_the_cpus_per_node_cover_the_ranks_there():
    """16 ranks x 8 CPUs + 8 one-CPU data workers on 2 nodes of 8 GPUs: each node hosts 8 ranks (64 CPUs), the
    data workers split 4 and 4, and one validation actor CPU: 69 on one of them (the fewest that pack)."""
    d = _directives(render("slurm", TemplateParams(config=FLUX, overrides=FLUX_16, workdir=str(ROOT), nodes=2,
                                                   gpus_per_node=8)))
    assert (d["cpus-per-task"], d["mem"]) == ("69", "0")  # --mem=0: all of each node's memory
    with pytest.raises(TemplateError) as err:  # the old default shape: 8 CPUs per node for 8 ranks of 8 CPUs
        render("slurm", TemplateParams(config=FLUX, overrides=FLUX_16, workdir=str(ROOT), nodes=2, gpus_per_node=8,
                                       cpus_per_node=8))
    assert "\n" not in str(err.value) and "the nodes cannot hold this run" in str(err.value)
    assert "missing CPU 121" in str(err.value)


HOSTNAME_DOUBLE = """#!/bin/bash
# test double for `hostname` on a stock Debian/Ubuntu host: its own name resolves to 127.0.1.1
if [[ "$1" == --ip-address || "$1" == -i ]]; then echo 127.0.1.1; else echo node1; fi
"""


def test_the_slurm_head_address_is_routable(tmp_path):
    """The rendered script's head-address step, run by bash on this machine with a Debian-style `hostname`
    (and `srun` / `scontrol` test doubles): an address of this host that is not 127.0.1.1."""
    import os
    import socket
    import sys

    text = _sbatch(nodes=1, gpus_per_node=6)
    block = text[text.index("mapfile -t nodes"):text.index('echo "piflow: ray head on')]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("hostname", HOSTNAME_DOUBLE), ("srun", SRUN_DOUBLE), ("scontrol", SCONTROL_DOUBLE)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "head.sh"
    script.write_text("set -euo pipefail\n" + block + 'echo "$head_ip"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "localhost"}
    env.pop("PIFLOW_HEAD_IP", None)
    head_ip = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert head_ip != "127.0.1.1"
    with socket.socket() as s:  # an address of this host: a server can bind it
        s.bind((head_ip, 0))
    env["PIFLOW_HEAD_IP"] = "10.1.2.3"  # the override, for hosts whose routes say otherwise
    assert subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True).stdout.strip() == "10.1.2.3"


def test_the_kuberay_manifest_runs_as_rendered():
    from cluster.job_templates import Shape, scratch_gb
    from cluster.submit import SECRET_EXCLUDES  # noqa: F401 (the Dockerfile's context is checked below)
    from trainer.config import load_config
    from trainer.planner.memory import count_model

    docs = list(yaml.safe_load_all(render("kuberay", TemplateParams(
        config=FLUX, overrides=[*FLUX_16, *SHAPE], image="registry.example/piflow:1", secret="flux-creds"))))
    cm, job = docs
    spec = job["spec"]
    assert spec["entrypoint"].startswith("piflow train ") and "activeDeadlineSeconds" not in str(docs)
    pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"],
            spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]]
    cfg = load_config(FLUX, [*FLUX_16, *SHAPE])
    size = scratch_gb(cfg, Shape(2, 8, 96, 1000))
    snapshot = count_model(cfg).total * 2 / 1e9  # the transformer alone, bf16 on the hub: 23.8 GB
    assert snapshot + 10 <= size  # + T5-XXL, CLIP, VAE
    # (23.8 GB transformer + 10 GB encoders + 8 ranks x 0.635e9 LoRA/head params / 16 ranks x 16 B x 3) x 1.25
    assert size == 70
    for pod in pods:
        container = pod["containers"][0]
        assert container["image"] == "registry.example/piflow:1"
        assert container["envFrom"] == [{"secretRef": {"name": "flux-creds", "optional": True}}]
        assert {"name": "HF_HOME", "value": "/scratch/huggingface"} in container["env"]
        assert container["resources"]["limits"] == {"cpu": "96", "memory": "1000G", "nvidia.com/gpu": "8"}
        assert {"name": "scratch", "mountPath": "/scratch"} in container["volumeMounts"]
        volume = next(v for v in pod["volumes"] if v["name"] == "scratch")
        assert volume["ephemeral"]["volumeClaimTemplate"]["spec"]["resources"]["requests"]["storage"] == f"{size}G"
    resolved = yaml.safe_load(cm["data"]["config.yaml"])
    assert resolved["run"]["scratch"] == "/scratch" and resolved["cluster"]["student"]["workers"] == 16
    assert "WANDB_API_KEY" not in str(docs).replace("--from-literal=WANDB_API_KEY", "")  # no value in the manifest


def test_the_dockerfile_installs_this_checkout_on_the_pinned_ray():
    from importlib.metadata import version

    from cluster.submit import SECRET_EXCLUDES

    dockerfile = (ROOT / "Dockerfile").read_text()
    base = next(line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM "))
    assert base.startswith(f"rayproject/ray:{version('ray')}-") and base.endswith("-gpu")  # = KubeRay's rayVersion
    assert "pip install --no-cache-dir ." in dockerfile
    for package in ("cluster", "trainer", "models", "data_pipeline", "configs"):
        assert f"COPY --chown=ray:users {package} ./{package}" in dockerfile
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert set(SECRET_EXCLUDES) <= ignored  # no credential of the working dir enters the image


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
    for name, text in (("srun", SRUN_DOUBLE), ("scontrol", SCONTROL_DOUBLE), ("hostname", HOSTNAME_DOUBLE)):
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


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*_gm_*.yaml")))
def test_every_production_recipe_renders_on_the_node_shape_it_states(recipe):
    """A recipe states its cluster (cluster.nodes x cluster.gpus_per_node, CPUs, memory): rendered with no shape
    options, the SLURM script and the KubeRay manifest must hold every actor the run asks for (it failed: the
    validation actor's GPU made FLUX, Qwen-Image and Wan ask for one GPU more than their nodes have)."""
    from trainer.config import load_config

    cfg = load_config(ROOT / "configs" / recipe)
    d = _directives(render("slurm", TemplateParams(config=str(ROOT / "configs" / recipe), workdir=str(ROOT))))
    assert d["nodes"] == str(cfg.cluster.nodes) and d["gpus-per-node"] == str(cfg.cluster.gpus_per_node)
    assert "RayJob" in render("kuberay", TemplateParams(config=str(ROOT / "configs" / recipe), image="r/p:1"))
