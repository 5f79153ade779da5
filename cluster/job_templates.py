"""Render the cluster templates in `cluster/templates/` for a config and a resource shape:

    piflow template slurm CONFIG --nodes 4 --gpus-per-node 8 [key.sub=value ...] > run.sbatch
    piflow template kuberay CONFIG --nodes 4 --gpus-per-node 8 > rayjob.yaml

Placeholders are `{{name}}`; every one must be filled and every value is quoted for its target (shell words
for the sbatch script, JSON scalars, which YAML reads as strings, for the manifest). The config is validated
with its overrides first, and a config that needs more GPUs than the shape provides is refused.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "templates"
FILES = {"slurm": "slurm.sbatch", "kuberay": "kuberay-rayjob.yaml"}  # the closed choice of `piflow template`
_FIELD = re.compile(r"\{\{(\w+)\}\}")


class TemplateError(ValueError):
    pass


@dataclass
class TemplateParams:
    config: str
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int = 8
    mem_per_node: str = "64G"
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""
    venv: str = ""  # SLURM: virtualenv activated on the batch node (srun steps inherit its PATH)
    workdir: str = ""  # SLURM: checkout on the shared filesystem; "" = the current directory
    image: str = "rayproject/ray:2.60.0-py311"
    namespace: str = "default"
    gcs_port: int = 6379
    dashboard_port: int = 8265
    backoff_limit: int = 0


def fill(text: str, values: dict[str, str]) -> str:
    """Replace every {{name}}; a placeholder without a value, or a value without a placeholder, is an error."""
    names = set(_FIELD.findall(text))
    missing, unused = sorted(names - values.keys()), sorted(values.keys() - names)
    if missing or unused:
        raise TemplateError(f"template fields: missing values for {missing}, values for no field {unused}")
    return _FIELD.sub(lambda m: values[m.group(1)], text)


def job_name(run_name: str) -> str:
    """A DNS-1123 label (Kubernetes object names), also fine as a SLURM job name."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")[:40].strip("-")
    return name or "piflow"


def gpus_needed(cfg) -> float:
    need = cfg.cluster.student.workers * cfg.cluster.student.gpus_per_worker
    if cfg.teacher.placement == "separate":
        need += cfg.teacher.replicas * cfg.teacher.gpus_per_replica
    return need


def _check_shape(cfg, p: TemplateParams) -> None:
    if p.nodes < 1:
        raise TemplateError(f"--nodes must be >= 1, got {p.nodes}")
    need, have = gpus_needed(cfg), p.nodes * p.gpus_per_node
    if need > have:
        raise TemplateError(f"{p.config}: the config needs {need:g} GPUs (cluster.student: {cfg.cluster.student.workers} "
                            f"x {cfg.cluster.student.gpus_per_worker:g}, teacher: {cfg.teacher.replicas} x "
                            f"{cfg.teacher.gpus_per_replica:g}) but {p.nodes} node(s) x {p.gpus_per_node} GPU(s) "
                            f"provide {have}")


def render(kind: str, p: TemplateParams) -> str:
    from trainer.config import dump_config, load_config

    if kind not in FILES:
        raise TemplateError(f"unknown template {kind!r}: one of {', '.join(FILES)}")
    cfg = load_config(p.config, p.overrides)
    _check_shape(cfg, p)
    name = job_name(cfg.run.name)
    text = (TEMPLATES / FILES[kind]).read_text()
    if kind == "slurm":
        extra = [f"#SBATCH --gpus-per-node={p.gpus_per_node}" if p.gpus_per_node else "",
                 f"#SBATCH --partition={p.partition}" if p.partition else "",
                 f"#SBATCH --account={p.account}" if p.account else ""]
        workdir = Path(p.workdir or ".").resolve()
        config = Path(p.config).resolve()
        try:  # submit uploads the working dir: the config must travel inside it
            config_arg = config.relative_to(workdir).as_posix()
        except ValueError:
            raise TemplateError(f"{p.config}: must be inside the working dir {workdir} (--workdir)") from None
        values = {
            "job_name": name, "nodes": str(p.nodes), "cpus_per_node": str(p.cpus_per_node),
            "gpus_per_node": str(p.gpus_per_node), "mem_per_node": shlex.quote(p.mem_per_node),
            "time": shlex.quote(p.time), "sbatch_extra": "\n".join(e for e in extra if e),
            "workdir": shlex.quote(str(workdir)), "config": shlex.quote(config_arg),
            "overrides": " ".join(shlex.quote(o) for o in p.overrides),
            "gcs_port": str(p.gcs_port), "dashboard_port": str(p.dashboard_port),
            "activate": f"source {shlex.quote(str(Path(p.venv) / 'bin' / 'activate'))}" if p.venv else "",
        }
    else:
        resources = {"cpu": str(p.cpus_per_node), "memory": p.mem_per_node}
        if p.gpus_per_node:
            resources["nvidia.com/gpu"] = str(p.gpus_per_node)
        resolved = dump_config(cfg)
        values = {
            "job_name": name, "namespace": json.dumps(p.namespace), "image": json.dumps(p.image),
            "workers": str(p.nodes - 1), "cpus_per_node": str(p.cpus_per_node),
            "gpus_per_node": str(p.gpus_per_node), "resources": json.dumps(resources),
            "backoff_limit": str(p.backoff_limit), "ray_version": _ray_version(),
            "config_yaml": "\n".join("    " + line for line in resolved.splitlines()),
        }
    return fill(text, values)


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")
