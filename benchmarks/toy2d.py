"""The 2-D toy side-by-side table of issue 2, in one command:

    .venv/bin/python benchmarks/toy2d.py            # or: make toy2d-bench

GM students (K=8) trained at 1, 2 and 4 NFE, DX students at 4 NFE (grid N=10 and polynomial P=10), the
teacher's Euler at 1/2/4 NFE, a shortcut-prediction baseline and the 'auto' temperature row, all scored against
a 256-step teacher set (>= 4096 samples, every figure averaged over >= 3 sampling seeds; ED noise floor over >= 4
independent teacher pairs). Iteration counts, not time budgets, so the numbers do not depend on machine load.
Prints the table and the bars, writes benchmarks/results/toy2d.json (one record per method). With a --methods
subset the measured rows and bars are merged into the existing JSON (the other rows are kept as they were).

DX students train with window_substeps = 3, as every DX config of the reference does: with a window of 0 the
queries reach sigma ~ 1e-4, where the DX velocity (x_t - x0) / sigma makes one sample carry most of the
gradient (benchmarks/toy2d_dx.py measures it).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

from models.families.toy2d import NUM_MODES, ToyMixture, euler_sample
from trainer.config import load_config
from trainer.local_run import build_family
from trainer.teachers.build import build_teacher
from trainer.evaluation.toy2d import (bars, distill, evaluate, floor_row, format_table, student_sampler, teacher_sets,
                                teacher_sets_cache, train_shortcut, with_overrides, write_json)

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("euler", "gm1", "gm2", "gm4", "dx4", "dxp4", "shortcut")
DX_WINDOW = 3.0  # window_substeps of the DX students (the reference's DX configs)
# Rows of older result files that a re-measured method replaces (they carry no "key").
LEGACY_LABELS = {"dx4": ("DX pi-ID (N=10)", 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "toy2d.yaml"))
    ap.add_argument("--iters-gm", type=int, default=2000, help="pi-ID iterations of each GM student")
    ap.add_argument("--iters-dx", type=int, default=2000, help="pi-ID iterations of the DX student")
    ap.add_argument("--dx-lr", type=float, default=None, help="DX learning rate (default: the config's optim.lr)")
    ap.add_argument("--iters-shortcut", type=int, default=4000)
    ap.add_argument("--shortcut-pairs", type=int, default=16384, help="(noise, 256-step endpoint) training pairs")
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--floor-pairs", type=int, default=4)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0 = torch's default); the toy's ops are tiny and extra threads spin "
                         "against each other on a shared machine")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "toy2d.json"))
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")

    t_start = time.perf_counter()
    base = load_config(args.config, [*args.overrides, "eval.every=0", "run.output=runs/toy2d_bench"])
    family = build_family(base)
    teacher = build_teacher(base, family)
    sets = teacher_sets(teacher, args.samples, args.floor_pairs,
                        cache=teacher_sets_cache(base, args.samples, args.floor_pairs))
    print(f"ED noise floor {sets.floor:.3e} (pairs: {', '.join(f'{e:.2e}' for e in sets.floor_eds)})")
    ev = dict(sets=sets, seeds=args.seeds, num_samples=args.samples)
    results, rows = [floor_row(sets)], {}

    if "euler" in methods:
        for n in (1, 2, 4):
            rows[f"euler{n}"] = evaluate(f"teacher Euler {n}", n, lambda z, n=n: euler_sample(teacher, z, n), **ev)
            results.append(rows[f"euler{n}"])

    students = [("gm1", 1, "gm", "grid"), ("gm2", 2, "gm", "grid"), ("gm4", 4, "gm", "grid"),
                ("dx4", 4, "dx", "grid"), ("dxp4", 4, "dx", "polynomial")]
    for key, nfe, policy, dx_mode in students:
        if key not in methods:
            continue
        dx = policy == "dx"
        lr = (args.dx_lr or base.optim.lr) if dx else base.optim.lr
        iters = args.iters_dx if dx else args.iters_gm
        window = DX_WINDOW if dx else base.distill.window_substeps
        cfg = with_overrides(base, distill={"nfe": nfe, "final_step_scale": 1.0, "window_substeps": window},
                             policy={"type": policy, "dx_mode": dx_mode}, train={"iters": iters}, optim={"lr": lr},
                             run={"output": f"runs/toy2d_bench/{key}"})
        run, seconds = distill(cfg)
        n = cfg.policy.num_grid
        label = (f"GM pi-ID (K={cfg.policy.num_components})" if not dx else
                 f"DX pi-ID {dx_mode} ({'N' if dx_mode == 'grid' else 'P'}={n}, window {window:g}, lr {lr:g})")
        rows[key] = evaluate(label, nfe, student_sampler(run, 1.0, cfg), train_iters=iters, train_seconds=seconds,
                             **ev)
        results.append(rows[key])
        print(format_table([rows[key]], sets.floor).splitlines()[2])
        if key == "gm4":
            rows["gm4_auto"] = evaluate("GM pi-ID, temperature 'auto' (0.3)", nfe,
                                        student_sampler(run, "auto", cfg), train_iters=iters, **ev)
            results.append(rows["gm4_auto"])

    if "shortcut" in methods:
        t0 = time.perf_counter()
        model = train_shortcut(teacher, teacher.network, args.iters_shortcut, args.shortcut_pairs,
                               base.train.batch_size, base.optim.lr, seed=base.run.seed)
        rows["shortcut"] = evaluate("shortcut prediction (noise -> 256-step endpoint)", 1, model, **ev,
                                    train_iters=args.iters_shortcut, train_seconds=time.perf_counter() - t0)
        results.append(rows["shortcut"])

    for key, row in rows.items():
        row.key = key
    bar_results = bars(rows, sets.floor, NUM_MODES)
    print()
    print(format_table(results, sets.floor))
    print()
    for name, ok in bar_results.items():
        print(f"  bar {name}: {'PASS' if ok else 'FAIL'}")
    meta = {"command": " ".join(["benchmarks/toy2d.py", *(argv if argv is not None else sys.argv[1:])]),
            "samples": args.samples, "seeds": args.seeds, "floor_pairs": args.floor_pairs,
            "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "seconds": round(time.perf_counter() - t_start, 1), "mixture_centres": ToyMixture.default().centres.tolist(),
            "ed_noise_floor": sets.floor}
    if set(methods) == set(METHODS) or not Path(args.out).exists():
        write_json(Path(args.out), results, sets.floor, bar_results, meta)
    else:
        merge_json(Path(args.out), [r for r in results if r.key], bar_results, meta)
    print(f"\nwrote {args.out} ({meta['seconds']} s)")
    return 0 if all(bar_results.values()) else 1


def merge_json(path: Path, results: list, bar_results: dict[str, bool], meta: dict) -> None:
    """Replace the re-measured methods' records and bars in an existing result file, keep everything else.
    The floor row and ED / floor of kept rows stay those of the run that wrote the file; the new rows carry the
    floor of this run in `ed_noise_floor` (the same teacher sets and seeds give the same floor)."""
    with _locked(path):
        _merge_json(path, results, bar_results, meta)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock beside `path`: benchmark processes that finish together merge one after the other."""
    import fcntl

    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _merge_json(path: Path, results: list, bar_results: dict[str, bool], meta: dict) -> None:
    data = json.loads(path.read_text())
    keys = {r.key for r in results}
    legacy = {LEGACY_LABELS[k] for k in keys if k in LEGACY_LABELS} | {(r.method, r.nfe) for r in results}
    kept = [m for m in data["methods"]
            if m.get("key") not in keys and (m.get("key") or (m["method"], m["nfe"]) not in legacy)]
    new = [dict(r.__dict__, ed_noise_floor=meta["ed_noise_floor"]) for r in results]
    data["methods"] = kept + new
    data["bars"] = dict(data.get("bars", {}), **bar_results)
    data.setdefault("merged_runs", []).append(meta)
    path.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    sys.exit(main())
