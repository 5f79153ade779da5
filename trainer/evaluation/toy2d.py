"""The 2-D toy side by side (issue 2): distil students, train the shortcut baseline, and score every method
against a 256-step teacher sample set. Shared by `benchmarks/toy2d.py` (the full table) and `piflow demo`
(a shorter run: teacher plus the 4-NFE GM student, with a scatter plot).

Every figure is averaged over `seeds` sampling seeds; the ED noise floor is the mean ED over `floor_pairs`
pairs of independent 256-step teacher sets (one pair alone varies by about +-45%, PIFLOW.md §10).
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from trainer.config import Config, config_from_dict

REFERENCE_STEPS = 256


@dataclass
class MethodResult:
    method: str
    nfe: int
    ed: float  # mean over seeds
    ed_std: float
    ed_over_floor: float
    modes_covered: float  # mean over seeds
    off_mode: float
    mode_weight_error: float
    train_iters: int = 0
    train_seconds: float = 0.0
    per_seed: list[dict] = field(default_factory=list)
    key: str = ""  # the benchmark's method key (gm4, dx4, ...), used to merge re-measured rows


@dataclass
class TeacherSets:
    reference: torch.Tensor  # (n, 2, 1, 1) the 256-step set every method is compared with
    floor_sets: list[tuple[torch.Tensor, torch.Tensor]]  # independent pairs
    floor: float  # mean ED over the pairs
    floor_eds: list[float]


def with_overrides(cfg: Config, **sections: dict) -> Config:
    """A copy of cfg with {section: {key: value}} replaced, validated like a file."""
    data = cfg.to_dict()
    for section, values in sections.items():
        node = data
        for part in section.split("."):
            node = node[part]
        node.update(values)
    return config_from_dict(data, source="<toy2d benchmark>")


def teacher_sets(teacher, num_samples: int, floor_pairs: int, seed: int = 10_000, progress: bool = True,
                 cache: Path | None = None) -> TeacherSets:
    """The reference set and `floor_pairs` independent pairs of 256-step teacher samples. With `cache` (a file
    path that names the teacher, e.g. next to its cached weights) the sets are read from it when present and
    written to it otherwise: the 256-step sets are the most expensive part of a benchmark that only re-measures
    a few students, and they depend only on the teacher, the sizes and the seeds."""
    from models.families.toy2d import energy_distance, euler_sample, to_image

    n_sets = 1 + 2 * floor_pairs
    if cache is not None and cache.exists():
        from safetensors.torch import load_file

        stored = load_file(str(cache))
        sets = [stored[f"set{i}"] for i in range(n_sets)]
    else:
        sets = []
        for i in tqdm(range(n_sets), desc=f"teacher {REFERENCE_STEPS}-step sets", disable=not progress):
            noise = to_image(torch.randn(num_samples, 2, generator=torch.Generator().manual_seed(seed + i)))
            sets.append(euler_sample(teacher, noise, REFERENCE_STEPS))
        if cache is not None:
            from safetensors.torch import save_file

            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            save_file({f"set{i}": s.contiguous() for i, s in enumerate(sets)}, str(tmp))
            tmp.replace(cache)  # atomic: a concurrent benchmark never reads half a file
    pairs = [(sets[1 + 2 * j], sets[2 + 2 * j]) for j in range(floor_pairs)]
    eds = [energy_distance(a, b) for a, b in pairs]
    return TeacherSets(sets[0], pairs, statistics.fmean(eds), eds)


def teacher_sets_cache(cfg: Config, num_samples: int, floor_pairs: int, seed: int = 10_000) -> Path:
    """Where `teacher_sets` keeps the sets of the cached toy teacher of `cfg`."""
    from trainer.teachers.build import teacher_path

    path = teacher_path(cfg)
    return path.with_name(f"{path.stem}.sets-{REFERENCE_STEPS}step-{num_samples}x{1 + 2 * floor_pairs}-s{seed}.safetensors")


def evaluate(method: str, nfe: int, sampler: Callable[[torch.Tensor], torch.Tensor], sets: TeacherSets,
             seeds: int, num_samples: int, **extra) -> MethodResult:
    """Average the toy metrics of `sampler(noise (n, 2, 1, 1)) -> x0` over `seeds` noise draws."""
    from models.families.toy2d import ToyMixture, distribution_metrics, to_image

    mixture = ToyMixture.default()
    per_seed = []
    for s in range(seeds):
        noise = to_image(torch.randn(num_samples, 2, generator=torch.Generator().manual_seed(s)))
        with torch.no_grad():
            per_seed.append(distribution_metrics(sampler(noise), sets.reference, mixture))
    mean = {k: statistics.fmean(r[k] for r in per_seed) for k in per_seed[0]}
    eds = [r["ed"] for r in per_seed]
    return MethodResult(method, nfe, mean["ed"], statistics.pstdev(eds), mean["ed"] / sets.floor,
                        mean["modes_covered"], mean["off_mode"], mean["mode_weight_error"], per_seed=per_seed,
                        **extra)


def floor_row(sets: TeacherSets) -> MethodResult:
    """The teacher's own 256-step sets scored like a method (their ED is the noise floor by definition)."""
    from models.families.toy2d import ToyMixture, distribution_metrics

    mixture = ToyMixture.default()
    per = [distribution_metrics(a, b, mixture) for a, b in sets.floor_sets]
    mean = {k: statistics.fmean(r[k] for r in per) for k in per[0]}
    return MethodResult(f"teacher Euler {REFERENCE_STEPS} (noise floor)", REFERENCE_STEPS, mean["ed"],
                        statistics.pstdev(sets.floor_eds), 1.0, mean["modes_covered"], mean["off_mode"],
                        mean["mode_weight_error"], per_seed=per)


def distill(cfg: Config, progress: bool = True):
    """One in-process pi-ID run (no checkpoints); returns (LocalRun, seconds)."""
    from trainer.local_run import run_local

    t0 = time.perf_counter()
    run = run_local(cfg, progress=progress, checkpoints=False)
    return run, time.perf_counter() - t0


def student_sampler(run, temperature, cfg: Config) -> Callable[[torch.Tensor], torch.Tensor]:
    """Few-step sampling with the run's EMA weights."""
    from models.sampling import sample

    d = cfg.distill

    def fn(noise):
        with run.ema.applied():
            return sample(run.student.make_policy, noise, d.nfe, d.final_step_scale, d.shift, d.total_substeps,
                          temperature=temperature)

    return fn


def train_shortcut(teacher, network, iters: int, num_pairs: int, batch_size: int, lr: float, seed: int = 0,
                   progress: bool = True):
    """The shortcut-prediction baseline: the teacher's network fine-tuned to map noise z to the teacher's
    256-step endpoint in one step (x0 = z - u(z, 1)), MSE on (z, endpoint) pairs, cosine lr."""
    from models.families.toy2d import ToyShortcutStudent, euler_sample, to_image

    gen = torch.Generator().manual_seed(seed + 777)
    z = to_image(torch.randn(num_pairs, 2, generator=gen))
    x0 = euler_sample(teacher, z, REFERENCE_STEPS)
    model = ToyShortcutStudent(network)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / max(iters, 1))))
    for _ in tqdm(range(iters), desc="shortcut baseline", disable=not progress, mininterval=1.0):
        idx = torch.randint(0, num_pairs, (batch_size,), generator=gen)
        loss = ((model(z[idx]) - x0[idx]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


# ----------------------------------------------------------------------------------------------- report
BAR_NAMES = ("gm4_ed_within_1.5x_floor", "gm4_all_modes", "gm4_off_mode_le_0.05", "gm4_mode_weight_err_le_0.05",
             "gm1_ed_below_teacher_euler4", "dx4_off_mode_le_0.05", "dx4_ed_within_1.5x_floor",
             "dxp4_off_mode_le_0.05", "dxp4_ed_within_1.5x_floor")


def bars(rows: dict[str, MethodResult], floor: float, num_modes: int) -> dict[str, bool]:
    out = {}
    gm4 = rows.get("gm4")
    if gm4 is not None:
        out["gm4_ed_within_1.5x_floor"] = gm4.ed <= 1.5 * floor
        out["gm4_all_modes"] = all(r["modes_covered"] == num_modes for r in gm4.per_seed)
        out["gm4_off_mode_le_0.05"] = gm4.off_mode <= 0.05
        out["gm4_mode_weight_err_le_0.05"] = gm4.mode_weight_error <= 0.05
    if "gm1" in rows and "euler4" in rows:
        out["gm1_ed_below_teacher_euler4"] = rows["gm1"].ed < rows["euler4"].ed
    for key in ("dx4", "dxp4"):  # issue 16: DX (grid and polynomial) at 4 NFE
        if key in rows:
            out[f"{key}_off_mode_le_0.05"] = rows[key].off_mode <= 0.05
            out[f"{key}_ed_within_1.5x_floor"] = rows[key].ed <= 1.5 * floor
    return out


def format_table(results: list[MethodResult], floor: float) -> str:
    head = "| method | NFE | ED (mean +- std over seeds) | ED / floor | modes covered | off-mode | mode-weight err (TV) |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.method} | {r.nfe} | {r.ed:.3e} +- {r.ed_std:.1e} | {r.ed_over_floor:.2f} | "
                     f"{r.modes_covered:.2f} | {r.off_mode:.4f} | {r.mode_weight_error:.4f} |")
    lines.append(f"\nED noise floor: {floor:.3e} (mean over independent pairs of {REFERENCE_STEPS}-step teacher sets)")
    return "\n".join(lines)


def write_json(path: Path, results: list[MethodResult], floor: float, bar_results: dict[str, bool], meta: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{k: v for k, v in r.__dict__.items()} for r in results]
    path.write_text(json.dumps({"meta": dict(meta, ed_noise_floor=floor), "bars": bar_results,
                                "methods": records}, indent=2))


def scatter_plot(path: Path, panels: list[tuple[str, torch.Tensor]], centres: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels):
        p = pts.reshape(-1, 2)
        ax.scatter(p[:, 0], p[:, 1], s=1.5, alpha=0.35, linewidths=0)
        ax.scatter(centres[:, 0], centres[:, 1], s=25, marker="x", c="red")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- demo
def run_demo(cfg: Config, out_dir: Path, samples: int = 4096, seeds: int = 3, floor_pairs: int = 4) -> dict[str, bool]:
    """Teacher (trained and cached on first use) + the 4-NFE GM student; a table, a JSON and a scatter PNG
    (teacher 256 steps | teacher Euler 4 | GM student 4 NFE) in out_dir. Returns the GM-4 bars."""
    from models.families.toy2d import NUM_MODES, ToyMixture, euler_sample, to_image
    from trainer.local_run import build_family
    from trainer.teachers.build import build_teacher

    t_start = time.perf_counter()
    family = build_family(cfg)
    teacher = build_teacher(cfg, family)
    run, seconds = distill(cfg)
    sets = teacher_sets(teacher, samples, floor_pairs)
    rows = {"euler4": evaluate("teacher Euler 4", 4, lambda z: euler_sample(teacher, z, 4), sets, seeds, samples),
            "gm4": evaluate(f"GM pi-ID (K={cfg.policy.num_components})", cfg.distill.nfe,
                            student_sampler(run, 1.0, cfg), sets, seeds, samples,
                            train_iters=cfg.train.iters, train_seconds=seconds)}
    results = [floor_row(sets), rows["euler4"], rows["gm4"]]
    bar_results = bars(rows, sets.floor, NUM_MODES)
    table = format_table(results, sets.floor)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [table, ""] + [f"bar {k}: {'PASS' if v else 'FAIL'}" for k, v in bar_results.items()]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    write_json(out_dir / "results.json", results, sets.floor, bar_results,
               {"train_iters": cfg.train.iters, "seconds": round(time.perf_counter() - t_start, 1)})
    noise = to_image(torch.randn(samples, 2, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        panels = [(f"teacher, {REFERENCE_STEPS} Euler steps", sets.reference),
                  ("teacher, 4 Euler steps", euler_sample(teacher, noise, 4)),
                  (f"GM student, {cfg.distill.nfe} NFE (EMA)", student_sampler(run, 1.0, cfg)(noise))]
    scatter_plot(out_dir / "toy2d_demo.png", panels, ToyMixture.default().centres)
    print("\n" + "\n".join(lines))
    print(f"\nwrote {out_dir / 'toy2d_demo.png'}, {out_dir / 'results.md'}, {out_dir / 'results.json'} "
          f"({time.perf_counter() - t_start:.0f} s)")
    return bar_results
