"""A rehearsal's report: what it changed, what it checked, and the recipe's full-scale plan, as one table."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from trainer.config import Config


@dataclass
class Report:
    recipe: str
    changes: list[dict[str, Any]] = field(default_factory=list)
    losses: dict[int, float] = field(default_factory=dict)
    killed: dict[str, Any] = field(default_factory=dict)
    resume: dict[str, Any] = field(default_factory=dict)
    step_time_s: float = 0.0
    sample: dict[str, Any] = field(default_factory=dict)
    plan: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    passed: bool = False

    @property
    def finite(self) -> bool:
        return bool(self.losses) and all(math.isfinite(v) for v in self.losses.values())

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["losses"] = {str(k): v for k, v in self.losses.items()}
        d["finite"] = self.finite
        return d


# ------------------------------------------------------------------------------------------------ plan
def full_scale_plan(recipe: Config) -> list[str]:
    """`piflow plan` of the recipe as written, on the node shape it states (its public function)."""
    from trainer.planner.memory import format_plan, make_plan

    c = recipe.cluster
    gpus = c.nodes * c.gpus_per_node
    mem = c.gpu_memory_gb
    where = f"{c.nodes} x {c.gpus_per_node} GPUs x {mem:g} GB (cluster.*)"
    if not gpus or not mem:  # no node shape in the recipe: the GPUs its workers ask for, on 80 GB GPUs
        teacher = 0 if recipe.teacher.placement == "shared" else recipe.teacher.replicas * max(
            1, math.ceil(recipe.teacher.gpus_per_replica))
        gpus = int(recipe.cluster.student.workers * max(1.0, recipe.cluster.student.gpus_per_worker)) + teacher
        mem = 80.0
        where = f"{gpus} GPUs x 80 GB (no cluster.nodes / gpu_memory_gb in the recipe)"
    return [where, *format_plan(make_plan(recipe, gpus, mem), recipe).splitlines()]


# ------------------------------------------------------------------------------------------------ table
def format_table(report: Report) -> str:
    from trainer.rehearsal.snapshot import TINY_ARCH

    rows: list[tuple[str, str]] = []
    for c in report.changes:
        value = f"{_short(c['recipe'])} -> {_short(c['rehearsal'])}"
        if c["key"] == "model.pretrained":
            value += f": {TINY_ARCH.get(c['family'], 'tiny')}"
        rows.append((f"{c['key']} ({c['kind']})", value))
    rows.append(("losses finite", ("yes" if report.finite else "NO") + f": {len(report.losses)} steps, "
                 + ", ".join(f"{v:.5g}" for _, v in sorted(report.losses.items()))))
    r, k = report.resume, report.killed
    if r:
        rows.append(("resume exact", ("yes" if r["exact"] else "NO") + f": rank (pid {k.get('pid')}) killed after "
                     f"step {k.get('after_step')}, group restarted from the step-{r['resumed_from_step']} "
                     f"checkpoint; re-done steps {r['redone_steps']}: max relative loss difference "
                     f"{r['max_rel_diff']:.2g}"))
    rows.append(("step time", f"{report.step_time_s:.2f} s median ({report.machine.get('describe', '')})"))
    if report.sample:
        s = report.sample
        rows.append(("export + sample", f"{s['file']}: {s['shape']} at {s['nfe']} NFE, "
                     + ("finite" if s["finite"] else "NOT FINITE")))
    rows.append(("wall time", ", ".join(f"{k} {v:.0f} s" for k, v in report.seconds.items())))
    if report.plan:
        rows.append(("full-scale plan", report.plan[0]))
        rows += [("", line) for line in report.plan[1:] if line.strip()]
    width = max(len(a) for a, _ in rows)
    head = f"piflow rehearse {report.recipe}: {'PASS' if report.passed else 'FAIL'}"
    return "\n".join([head, *(f"  {a:<{width}}  {b}" for a, b in rows)])


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return (text or "''") if len(text) < 90 else text[:87] + "..."
