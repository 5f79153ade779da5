"""Resource preflight (issue 21): what a run asks of the Ray cluster against what the cluster has.

A run asks for the student group (`cluster.student.workers` ranks of CPU/GPU/memory/custom resource each), the
teacher replicas (separate placement), the data workers and feed (`data.shards`), the validation actor (shared
placement, `eval.every`) and the evaluation task (`eval.full_every`). `check(cfg)` packs those units onto the
live nodes' free resources (first fit, largest first: every unit must fit on ONE node), then onto the nodes the
autoscaler may still add (its node groups' `max_count`, when one is configured), and raises `CapacityError`,
one line naming what is missing and an override that fits, when they do not fit. It runs before Ray Train
starts: Ray Train v2 otherwise waits 60 s for the worker group, calls the timeout retryable and retries forever.

The same arithmetic sizes the restart after a lost node (`wait_for_students`, `largest_fitting_workers`) and the
node shape of the rendered templates (`cluster/job_templates.py`).
"""
from __future__ import annotations

import copy
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from trainer.config import Config, ConfigError

GB = 1e9  # Ray's `memory` resource counts bytes
_EPS = 1e-6


class CapacityError(RuntimeError):
    """The cluster cannot hold the run: one line naming what is missing and an override that fits."""


@dataclass(frozen=True)
class Demand:
    what: str  # "student rank", "teacher replica", ...
    bundle: dict  # one unit's Ray resources, e.g. {"CPU": 8.0, "GPU": 1.0}
    count: int


@dataclass(frozen=True)
class NodeGroup:
    """Nodes of one shape: `count` alive ones, or (autoscaler) up to `count` more that may be added."""
    shape: dict
    count: int


# ------------------------------------------------------------------------------------------ what a run asks
def _bundle(**resources: float) -> dict:
    return {k: float(v) for k, v in resources.items() if k and v > 0}


def student_bundle(cfg: Config) -> dict:
    s = cfg.cluster.student
    b = _bundle(CPU=s.cpus_per_worker, GPU=s.gpus_per_worker, memory=s.memory_gb_per_worker * GB)
    if s.custom_resource:
        b[s.custom_resource] = 1.0
    return b


def teacher_bundle(cfg: Config) -> dict:
    t = cfg.teacher
    b = _bundle(CPU=t.cpus_per_replica, GPU=t.gpus_per_replica)
    if t.custom_resource:
        b[t.custom_resource] = 1.0
    return b


def validation_gpus(cfg: Config) -> float:
    """GPUs of the validation actor of shared placement: `eval.validation_gpus` when the run has GPUs."""
    return cfg.eval.validation_gpus if cfg.cluster.student.gpus_per_worker > 0 else 0.0


def validation_bundle(cfg: Config) -> dict:
    b = _bundle(CPU=cfg.teacher.cpus_per_replica, GPU=validation_gpus(cfg))
    if cfg.teacher.custom_resource:
        b[cfg.teacher.custom_resource] = 1.0
    return b


def run_demands(cfg: Config) -> list[Demand]:
    """Every unit the run places, with its resources; units that need nothing are left out."""
    out = [Demand("student rank", student_bundle(cfg), cfg.cluster.student.workers)]
    if cfg.teacher.placement == "separate":
        out.append(Demand("teacher replica", teacher_bundle(cfg), cfg.teacher.replicas))
    elif cfg.eval.every:
        out.append(Demand("validation actor", validation_bundle(cfg), 1))
    if cfg.data.shards:
        pin = cfg.cluster.data_custom_resource
        worker = _bundle(CPU=cfg.cluster.data_cpus_per_worker, **({pin: 0.01} if pin else {}))
        out.append(Demand("data worker", worker, cfg.data.workers))
        if pin:
            out.append(Demand("data feed", {pin: 0.01}, 1))
    if cfg.eval.full_every:  # one evaluation task at a time, a teacher replica's resources (cluster/full_eval.py)
        out.append(Demand("evaluation task", teacher_bundle(cfg), 1))
    return [d for d in out if d.bundle and d.count > 0]


# ------------------------------------------------------------------------------------------ what a cluster has
def _fit_keys(resources: dict) -> dict:
    return {k: float(v) for k, v in resources.items() if not k.startswith("node:") and k != "object_store_memory"}


def live_nodes(free: bool = True) -> list[dict]:
    """Resources of every alive node: free ones (`free`) or totals. Needs a connected Ray."""
    import ray

    alive = {n["NodeID"]: _fit_keys(n["Resources"]) for n in ray.nodes() if n.get("Alive")}
    if not free:
        return list(alive.values())
    from ray._private import state  # the per-node view behind ray.available_resources()

    per_node = state.available_resources_per_node()
    return [_fit_keys(per_node.get(node_id, {})) for node_id in alive]


def autoscaler_groups(nodes_total: list[dict]) -> list[NodeGroup]:
    """Nodes the autoscaler may still add: per node group of its config (in the GCS when an autoscaler runs),
    `max_count` minus the alive nodes of that shape (unbounded groups: 1000). Empty without an autoscaler."""
    from ray._private import state

    try:
        config = state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler state in this GCS
        return []
    if config is None:
        return []
    groups = []
    for g in config.node_group_configs:
        shape = {k: float(v) for k, v in g.resources.items() if v > 0}
        if not shape or g.max_count == 0:
            continue
        alive = sum(1 for n in nodes_total if all(abs(n.get(k, 0.0) - v) < _EPS for k, v in shape.items()))
        room = 1000 if g.max_count < 0 else max(0, g.max_count - alive)
        if room:
            groups.append(NodeGroup(shape, room))
    return groups


# ------------------------------------------------------------------------------------------------- fitting
def _fits(bundle: dict, free: dict) -> bool:
    return all(free.get(k, 0.0) + _EPS >= v for k, v in bundle.items())


def pack(demands: list[Demand], nodes: list[dict], addable: list[NodeGroup] = ()) -> list[Demand]:
    """First fit, largest units first, onto `nodes` (free resources), then onto new nodes of the `addable`
    groups. Returns the units left over, one Demand per kind (empty: everything fits)."""
    free = [dict(n) for n in nodes]
    room = [[g.shape, g.count] for g in addable]
    units = sorted(((d.what, d.bundle) for d in demands for _ in range(d.count)),
                   key=lambda u: tuple(-u[1].get(k, 0.0) for k in ("GPU", "CPU", "memory")))
    left: Counter = Counter()
    bundles = {}
    for what, bundle in units:
        node = next((f for f in free if _fits(bundle, f)), None)
        if node is None:  # a node the autoscaler can still add
            group = next((g for g in room if g[1] > 0 and _fits(bundle, g[0])), None)
            if group is not None:
                group[1] -= 1
                node = dict(group[0])
                free.append(node)
        if node is None:
            left[what] += 1
            bundles[what] = bundle
            continue
        for k, v in bundle.items():
            node[k] = node.get(k, 0.0) - v
    return [Demand(w, bundles[w], n) for w, n in left.items()]


# ------------------------------------------------------------------------------------------------ messages
def _num(v: float) -> str:
    return f"{v:g}" if v < 1e6 else f"{v / GB:.0f}G"


def _res(bundle: dict) -> str:
    order = sorted(bundle, key=lambda k: ({"GPU": 0, "CPU": 1, "memory": 2}.get(k, 3), k))
    return "{" + ", ".join(f"{k} {_num(bundle[k])}" for k in order) + "}"


def _shapes(nodes: list[dict]) -> str:
    """'2 x {GPU 8, CPU 96}, 1 x {CPU 4}': nodes grouped by the resources runs ask for."""
    if not nodes:
        return "no nodes"
    counts = Counter(tuple(sorted((k, v) for k, v in n.items() if v > _EPS and not k.startswith("accelerator_type")))
                     for n in nodes)
    return ", ".join(f"{n} x {_res(dict(shape))}" for shape, n in counts.items())


def _totals(demands: list[Demand]) -> dict:
    total: Counter = Counter()
    for d in demands:
        for k, v in d.bundle.items():
            total[k] += v * d.count
    return dict(total)


def _with(cfg: Config, key: str, value) -> Config:
    out = copy.deepcopy(cfg)
    obj = out
    *path, last = key.split(".")
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, last, value)
    return out


def _valid(cfg: Config) -> bool:
    from trainer.config import validate

    try:
        validate(cfg, "<capacity>")
        return True
    except ConfigError:
        return False


def _demands(cfg: Config, students_only: bool) -> list[Demand]:
    return [d for d in run_demands(cfg) if d.what == "student rank" or not students_only]


def suggest(cfg: Config, nodes: list[dict], addable: list[NodeGroup] = (), students_only: bool = False) -> list[str]:
    """Overrides that make the run fit (the largest value of each knob that does, at most two)."""
    s, t = cfg.cluster.student, cfg.teacher
    candidates = []
    if not students_only and any(d.what == "validation actor" and d.bundle.get("GPU") for d in run_demands(cfg)):
        candidates.append(("eval.validation_gpus", [0]))
    candidates.append(("cluster.student.workers", list(range(s.workers - 1, 0, -1))))
    if t.placement == "separate" and not students_only:
        candidates.append(("teacher.replicas", list(range(t.replicas - 1, 0, -1))))
    if cfg.data.shards and cfg.cluster.data_cpus_per_worker > 0 and not students_only:
        candidates.append(("data.workers", list(range(cfg.data.workers - 1, 0, -1))))
    if s.cpus_per_worker > 0:
        candidates.append(("cluster.student.cpus_per_worker",
                           [c for c in range(math.ceil(s.cpus_per_worker) - 1, 0, -1)] + [0.5]))
    if s.memory_gb_per_worker > 0:
        candidates.append(("cluster.student.memory_gb_per_worker",
                           [s.memory_gb_per_worker * f for f in (0.75, 0.5, 0.25)]))
    out = []
    for key, values in candidates:
        for v in values:
            trial = _with(cfg, key, v)
            if _valid(trial) and not pack(_demands(trial, students_only), nodes, addable):
                out.append(f"{key}={v:g}")
                break
        if len(out) == 2:
            break
    return out


def shortfall(cfg: Config, nodes: list[dict], addable: list[NodeGroup] = (),
              totals: Optional[list[dict]] = None, students_only: bool = False) -> Optional[str]:
    """None when the run fits; else the one-line reason. `nodes`: free resources per node; `totals`: the same
    nodes' totals (to tell resources held by others apart from ones the cluster lacks); `students_only`: the
    student group alone (a restart, while the run's other groups hold theirs)."""
    demands = _demands(cfg, students_only)
    left = pack(demands, nodes, addable)
    if not left:
        return None
    asks = " + ".join(f"{d.count} {d.what}{'s' if d.count > 1 else ''} x {_res(d.bundle)}" for d in demands)
    need = _totals(demands)
    have: Counter = Counter()
    for n in nodes:
        have.update(n)
    for g in addable:
        for k, v in g.shape.items():
            have[k] += v * g.count
    missing = {k: v - have.get(k, 0.0) for k, v in need.items() if v > have.get(k, 0.0) + _EPS}
    missing = {k: missing[k] for k in sorted(missing, key=lambda k: ({"GPU": 0, "CPU": 1, "memory": 2}.get(k, 3), k))}
    unplaced = ", ".join(f"{d.count} {d.what}{'s' if d.count > 1 else ''}" for d in left)
    if missing:
        why = "missing " + ", ".join(f"{k} {_num(v)}" for k, v in missing.items())
    else:  # enough in sum, but no node has room for a whole unit
        why = f"no node has room for {unplaced} (each needs {_res(left[0].bundle)} on one node)"
    busy = ""
    if totals is not None and not pack(demands, totals, addable):
        busy = " (the cluster's nodes would hold it: the rest is in use by other jobs or actors)"
    scaler = (" + autoscaler: " + ", ".join(f"{g.count} x {_res(g.shape)}" for g in addable) + " more"
              if addable else ", no autoscaler")
    fixes = suggest(cfg, nodes, addable, students_only)
    fix = ("; an override that fits: " + " or ".join(fixes)) if fixes else "; add nodes or lower the request"
    return (f"the cluster cannot hold this run: it asks for {asks} = {_res(need)}; the cluster has "
            f"{_shapes(nodes)} free{scaler}; {why}{busy}{fix}")


def check(cfg: Config) -> None:
    """Raise CapacityError unless the run fits the connected Ray cluster (free resources and the autoscaler)."""
    totals = live_nodes(free=False)
    free = live_nodes(free=True)
    reason = shortfall(cfg, free, autoscaler_groups(totals), totals)
    if reason is not None:
        raise CapacityError(reason)


# ---------------------------------------------------------------------------------------- restarts (issue 21)
def students_fit(cfg: Config, workers: int) -> bool:
    """Whether `workers` student ranks fit the cluster's free resources now (the run's other groups already
    hold theirs)."""
    demand = Demand("student rank", student_bundle(cfg), workers)
    return not pack([demand], live_nodes(free=True), autoscaler_groups(live_nodes(free=False)))


def wait_for_students(cfg: Config, workers: int, timeout_s: float, poll_s: float = 2.0) -> bool:
    """Poll until `workers` ranks fit (True) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if students_fit(cfg, workers):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def largest_fitting_workers(cfg: Config, upto: int) -> int:
    """The largest world size <= `upto` that fits now and keeps the config valid (train.batch_size splits
    over it); 0 when none does."""
    for w in range(upto, 0, -1):
        if _valid(_with(cfg, "cluster.student.workers", w)) and students_fit(cfg, w):
            return w
    return 0
