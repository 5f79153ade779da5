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
TINY = str(ROOT / "configs" / "flux_dev_gm_k8_4nfe_tiny.yaml")
GPU_RUN = ["train.engine=deepspeed", "cluster.student.workers=4", "cluster.student.gpus_per_worker=1",
           "teacher.placement=separate", "teacher.replicas=2", "teacher.gpus_per_replica=1", "train.batch_size=8"]


def _sbatch(**kw) -> str:
    return render("slurm", TemplateParams(config=TINY, overrides=GPU_RUN, workdir=str(ROOT), **kw))


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
    assert out[:4] == [str(ROOT), "configs/flux_dev_gm_k8_4nfe_tiny.yaml", "2", "4"]
    assert out[4:] == GPU_RUN
    assert "RAY_AUTH_MODE=token" in text and "--dashboard-host=127.0.0.1" in text
    assert "echo $RAY_AUTH_TOKEN" not in text and "cluster.cli submit" in text


def test_rayjob_manifest_has_the_required_keys(tmp_path):
    docs = list(yaml.safe_load_all(render("kuberay", TemplateParams(
        config=TINY, overrides=GPU_RUN, nodes=3, gpus_per_node=2, cpus_per_node=12, mem_per_node="96Gi",
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
    assert main(["template", "slurm", TINY, "--nodes", "2", "--workdir", str(ROOT), "train.iters=20"]) == 0
    text = capsys.readouterr().out
    assert "OVERRIDES=(train.iters=20)" in text
    assert main(["template", "kuberay", TINY, "--nodes", "1", "cluster.student.gpus_per_worker=1"]) == 2
    assert "needs 1 GPUs" in capsys.readouterr().err


def test_config_outside_the_workdir_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(Path(TINY).read_text())
    with pytest.raises(TemplateError, match="inside the working dir"):
        render("slurm", TemplateParams(config=str(cfg), workdir=str(ROOT)))
    assert f"WORKDIR={shlex.quote(str(ROOT))}" in _sbatch(nodes=3, gpus_per_node=2)
