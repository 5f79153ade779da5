"""Render the cluster templates in `cluster/templates/` for a config:

    piflow template slurm CONFIG [key.sub=value ...] > run.sbatch
    piflow template kuberay CONFIG --image REGISTRY/piflow:TAG > rayjob.yaml

Placeholders are `{{name}}`; every one must be filled and every value is quoted for its target (shell words
for the sbatch script, JSON scalars, which YAML reads as strings, for the manifest). The config is validated
with its overrides first.

Issue 21: the node shape comes from the recipe (`cluster.nodes`, `cluster.gpus_per_node`, `cluster.cpus_per_node`,
`cluster.memory_gb_per_node`; the flags override them), and where the recipe leaves one out it is derived from
what the run asks for: the CPUs per node are the fewest on which the run's units pack (cluster/capacity.py, the
resource preflight's arithmetic). A shape that cannot hold the run is refused with the preflight's one line. The
KubeRay manifest also needs an image with piflow installed (the repository's Dockerfile), takes credentials from
a Kubernetes Secret and gives every pod a scratch volume sized from the plan (`scratch_gb`).
"""
from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

TEMPLATES = Path(__file__).resolve().parent / "templates"
FILES = {"slurm": "slurm.sbatch", "kuberay": "kuberay-rayjob.yaml"}  # the closed choice of `piflow template`
_FIELD = re.compile(r"\{\{(\w+)\}\}")
SCRATCH = "/scratch"  # the pods' scratch volume: run.scratch and the hub cache

# Approximate sizes (GB) of the text encoder + VAE folders of each family's public diffusers repo, for the
# scratch volume: FLUX.1-dev T5-XXL 9.5 + CLIP-L 0.25 + VAE 0.17; Qwen-Image Qwen2.5-VL-7B 16.6 + VAE 0.25;
# Wan2.1-T2V-14B umT5-XXL 11.4 + VAE 0.5; DiT the SD VAE 0.33 (class labels, no text encoder).
ENCODER_GB = {"flux": 10.0, "qwen_image": 16.9, "wan": 11.9, "dit": 0.4}


class TemplateError(ValueError):
    pass


@dataclass
class TemplateParams:
    config: str
    overrides: list[str] = field(default_factory=list)
    # the node shape: None = the recipe's cluster.* keys, else derived from what the run asks for
    nodes: Optional[int] = None
    gpus_per_node: Optional[int] = None
    cpus_per_node: Optional[int] = None
    mem_per_node: Optional[str] = None  # SLURM --mem / pod memory, e.g. "512G"
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""
    venv: str = ""  # SLURM: virtualenv activated on the batch node (srun steps inherit its PATH)
    workdir: str = ""  # SLURM: checkout on the shared filesystem; "" = the current directory
    image: str = ""  # KubeRay: an image built from the repository's Dockerfile (required)
    namespace: str = "default"
    secret: str = "piflow-credentials"  # KubeRay: the Secret whose keys become every pod's environment
    scratch_gb: Optional[int] = None  # KubeRay: per-pod scratch volume; None = sized from the plan
    storage_class: str = ""  # KubeRay: of the scratch volume ("" = the cluster's default)
    gcs_port: int = 6379
    dashboard_port: int = 8265
    backoff_limit: int = 0


@dataclass(frozen=True)
class Shape:
    nodes: int
    gpus: int
    cpus: int
    memory_gb: float  # 0 = all of the node's (SLURM --mem=0)


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


def _memory_gb(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?\s*", text or "", re.IGNORECASE)
    if not m:
        raise TemplateError(f"--mem-per-node {text!r}: expected a size like 512G or 96Gi")
    scale = {"k": 1e-6, "m": 1e-3, "g": 1.0, "t": 1e3}[(m.group(2) or "G")[0].lower()]
    return float(m.group(1)) * scale


def node_shape(cfg, p: TemplateParams) -> Shape:
    """The flags, else the recipe's node shape, else the smallest shape the run's units pack onto."""
    from cluster.capacity import pack, run_demands

    c = cfg.cluster
    nodes = p.nodes if p.nodes is not None else (c.nodes or 1)
    if nodes < 1:
        raise TemplateError(f"--nodes must be >= 1, got {nodes}")
    demands = run_demands(cfg)
    total = {k: sum(d.bundle.get(k, 0.0) * d.count for d in demands) for k in ("GPU", "CPU")}
    gpus = p.gpus_per_node if p.gpus_per_node is not None else (c.gpus_per_node or math.ceil(total["GPU"] / nodes))
    memory = _memory_gb(p.mem_per_node) if p.mem_per_node else c.memory_gb_per_node
    cpus = p.cpus_per_node if p.cpus_per_node is not None else c.cpus_per_node
    if not cpus:  # the fewest CPUs per node on which everything packs (at least 1)
        cpus, plenty = max(1, math.ceil(total["CPU"] / nodes)), math.ceil(total["CPU"]) + 1
        if not pack(demands, [_node(gpus, plenty, memory)] * nodes):  # else CPUs are not what is short
            while pack(demands, [_node(gpus, cpus, memory)] * nodes):
                cpus += 1
    return Shape(nodes, gpus, cpus, memory)


def _node(gpus: int, cpus: int, memory_gb: float) -> dict:
    node = {"CPU": float(cpus), "GPU": float(gpus)}
    if memory_gb:
        node["memory"] = memory_gb * 1e9
    return node


def _check_shape(cfg, p: TemplateParams, shape: Shape) -> None:
    """The run's units must pack onto the nodes (the resource preflight's arithmetic and its one line)."""
    from cluster.capacity import shortfall

    reason = shortfall(cfg, [_node(shape.gpus, shape.cpus, shape.memory_gb)] * shape.nodes)
    if reason:
        raise TemplateError(f"{p.config}: {shape.nodes} node(s) x {shape.gpus} GPU(s), {shape.cpus} CPU(s)"
                            f"{f', {shape.memory_gb:g} GB' if shape.memory_gb else ''}: "
                            + reason.replace("the cluster cannot hold", "the nodes cannot hold", 1))


def gpus_needed(cfg) -> float:
    from cluster.capacity import run_demands

    return sum(d.bundle.get("GPU", 0.0) * d.count for d in run_demands(cfg))


def scratch_gb(cfg, shape: Shape) -> int:
    """Per-node scratch from the plan: the teacher snapshot (the transformer's parameters at the hub's 2 bytes,
    4 for fp32 teachers, + the family's text encoders and VAE) + this node's checkpoint staging (its ranks'
    fp32 weights, Adam moments and EMA of the trained parameters: one save staged, a resharding load of up to
    two old ranks each), +25%, rounded up to 10 GB."""
    from trainer.planner.memory import count_model

    counts = count_model(cfg)
    width = 2 if cfg.model.dtype == "bfloat16" else 4
    snapshot = counts.total * width / 1e9 + ENCODER_GB.get(cfg.model.family, 0.0)
    trained = (counts.lora + counts.head + counts.norm_out) if cfg.lora.enabled else counts.total + counts.head
    ranks = math.ceil(cfg.cluster.student.workers / shape.nodes)
    staging = trained * 16 * 3 * ranks / cfg.cluster.student.workers / 1e9
    return max(10, int(math.ceil((snapshot + staging) * 1.25 / 10.0) * 10))


def render(kind: str, p: TemplateParams) -> str:
    from trainer.config import dump_config, load_config

    if kind not in FILES:
        raise TemplateError(f"unknown template {kind!r}: one of {', '.join(FILES)}")
    cfg = load_config(p.config, p.overrides)
    shape = node_shape(cfg, p)
    _check_shape(cfg, p, shape)
    name = job_name(cfg.run.name)
    text = (TEMPLATES / FILES[kind]).read_text()
    if kind == "slurm":
        extra = [f"#SBATCH --gpus-per-node={shape.gpus}" if shape.gpus else "",
                 f"#SBATCH --partition={p.partition}" if p.partition else "",
                 f"#SBATCH --account={p.account}" if p.account else ""]
        workdir = Path(p.workdir or ".").resolve()
        config = Path(p.config).resolve()
        try:  # submit uploads the working dir: the config must travel inside it
            config_arg = config.relative_to(workdir).as_posix()
        except ValueError:
            raise TemplateError(f"{p.config}: must be inside the working dir {workdir} (--workdir)") from None
        mem = p.mem_per_node or (f"{math.ceil(shape.memory_gb)}G" if shape.memory_gb else "0")  # 0: all of it
        values = {
            "job_name": name, "nodes": str(shape.nodes), "cpus_per_node": str(shape.cpus),
            "gpus_per_node": str(shape.gpus), "mem_per_node": shlex.quote(mem),
            "time": shlex.quote(p.time), "sbatch_extra": "\n".join(e for e in extra if e),
            "workdir": shlex.quote(str(workdir)), "config": shlex.quote(config_arg),
            "overrides": " ".join(shlex.quote(o) for o in p.overrides),
            "gcs_port": str(p.gcs_port), "dashboard_port": str(p.dashboard_port),
            "activate": f"source {shlex.quote(str(Path(p.venv) / 'bin' / 'activate'))}" if p.venv else "",
        }
    else:
        if not p.image:
            raise TemplateError("kuberay: --image is required: an image with this checkout installed, built from the "
                                "repository's Dockerfile (docker build -t REGISTRY/piflow:TAG . && docker push "
                                "REGISTRY/piflow:TAG)")
        if not shape.memory_gb:
            raise TemplateError(f"{p.config}: kuberay pods need a memory size: set cluster.memory_gb_per_node in the "
                                f"recipe or pass --mem-per-node")
        memory = p.mem_per_node or f"{math.ceil(shape.memory_gb)}G"
        resources = {"cpu": str(shape.cpus), "memory": memory}
        if shape.gpus:
            resources["nvidia.com/gpu"] = str(shape.gpus)
        size = p.scratch_gb if p.scratch_gb is not None else scratch_gb(cfg, shape)
        cfg.run.scratch = SCRATCH  # node-local staging, wandb files and the hub cache on the scratch volume
        storage_class = f"storageClassName: {json.dumps(p.storage_class)}, " if p.storage_class else ""
        values = {
            "job_name": name, "namespace": json.dumps(p.namespace), "image": json.dumps(p.image),
            "workers": str(shape.nodes - 1), "cpus_per_node": str(shape.cpus),
            "gpus_per_node": str(shape.gpus), "resources": json.dumps(resources),
            "backoff_limit": str(p.backoff_limit), "ray_version": _ray_version(),
            "secret": json.dumps(p.secret), "scratch_gb": str(size), "scratch": SCRATCH,
            "storage_class": storage_class,
            "config_yaml": "\n".join("    " + line for line in dump_config(cfg).splitlines()),
        }
    return fill(text, values)


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")
