"""Why pi-DX trains badly on the 2-D toy, measured (issue 16), in one command:

    .venv/bin/python benchmarks/toy2d_dx.py            # or: make toy2d-dx-bench

For each DX setting (mode, window_substeps, lr, training seed) it distils the 4-NFE DX student with the toy
config's protocol (data-free pi-ID, the same iterations, batch and sampling seeds as benchmarks/toy2d.py) and
reports, side by side:
- where the gradient comes from: for one pi-ID iteration at init and at the end, the per-sample gradient of the
  loss w.r.t. the policy's x0 values; `top1` = the largest sample's share of the squared gradient norm, `ess` =
  the effective number of samples (sum g)^2 / sum g^2 as a fraction of the batch, `min_sigma` = the smallest
  query noise level of the batch;
- the per-substep velocity error of the trained (EMA) policy against the teacher along its own 4-NFE rollout,
  RMS |pi(x, sigma) - u_teacher(x, sigma)| in bins of sigma;
- the loss trajectory (diverged = a non-finite loss or a final loss 10x the best) and the sample quality (ED /
  noise floor, off-mode fraction, averaged over sampling seeds).
Writes benchmarks/results/toy2d_dx.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python benchmarks/toy2d_dx.py` (the Makefile's way) must find benchmarks.toy2d

from benchmarks.toy2d import DX_WINDOW, _locked, merge_json
from models.families.toy2d import to_image
from models.piid import data_free_iteration
from models.rollout import rollout
from models.timesteps import step_grid, warp
from trainer.config import load_config
from trainer.local_run import build_family
from trainer.loop import piid_params
from trainer.teachers.build import build_teacher
from trainer.evaluation.toy2d import (distill, evaluate, student_sampler, teacher_sets, teacher_sets_cache,
                                with_overrides)

SIGMA_BINS = (0.0, 0.02, 0.1, 0.3, 1.0001)


class _Recorder:
    """Wraps a policy: every velocity the rollout asks for is compared with the teacher's at the same state."""

    def __init__(self, policy, teacher, records: list):
        self.policy, self.teacher, self.records = policy, teacher, records

    def velocity(self, x, sigma_t):
        u = self.policy.velocity(x, sigma_t)
        B = x.shape[0]
        sigma = torch.as_tensor(sigma_t, dtype=torch.float32).reshape(-1).expand(B)
        u_t = self.teacher(x.float(), sigma, None)
        err = (u.float() - u_t).pow(2).sum(dim=(1, 2, 3))  # (B,)
        self.records.append((float(sigma[0]), float(err.mean())))
        return u


@torch.no_grad()
def velocity_error_profile(make_policy, teacher, noise, nfe: int, f: float, shift: float, total: int) -> dict:
    """RMS |pi - u_teacher| per sigma bin along the policy's own nfe-step rollout (h = 0 sampling)."""
    taus, sigmas = step_grid(nfe, f, shift)
    x, records = noise.float(), []
    for k in range(nfe):
        policy = make_policy(x, torch.full((x.shape[0],), float(sigmas[k])))
        x = rollout(_Recorder(policy, teacher, records), x, float(taus[k]), float(taus[k + 1]), shift, total)
    out = {}
    for lo, hi in zip(SIGMA_BINS[:-1], SIGMA_BINS[1:]):
        errs = [e for s, e in records if lo <= s < hi]
        out[f"sigma_{lo:g}-{min(hi, 1):g}"] = math.sqrt(statistics.fmean(errs)) if errs else float("nan")
    return out


def gradient_concentration(make_policy, teacher, noise, params, seed: int = 0) -> dict:
    """One data-free pi-ID iteration: per-sample gradient norms of the loss w.r.t. the policy's x0 values, and
    the smallest noise level the teacher was queried at."""
    kept, sigmas = [], []
    sq = torch.zeros(noise.shape[0], dtype=torch.float64)

    def policy_of(x_src, sigma_src):
        kept.append(make_policy(x_src, sigma_src))
        return kept[-1]

    def teacher_seen(x, sigma, cond):
        sigmas.append(float(sigma.min()))
        return teacher(x, sigma, cond)

    gen = torch.Generator().manual_seed(seed)
    for loss, _ in data_free_iteration(policy_of, teacher_seen, noise, None, params, generator=gen):
        policy = kept[-1]
        # DX: the x0 values; GM: its x0-space means, log-weights and log-std (samples are independent)
        wrt = [policy.x0_grid] if hasattr(policy, "x0_grid") else [policy.mu, policy.logweights, policy.logstd]
        for g in torch.autograd.grad(loss, wrt):
            sq += g.double().pow(2).flatten(1).sum(dim=1)
    g = sq.sqrt()
    return {"top1": float(sq.max() / sq.sum()), "ess": float(g.sum() ** 2 / sq.sum() / g.numel()),
            "min_sigma": min(sigmas)}


def loss_summary(metrics_path: Path) -> dict:
    losses = []
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            v = rec["loss"]
            losses.append(float(v) if not isinstance(v, str) else float("nan"))
    finite = [v for v in losses if math.isfinite(v)]
    tail = finite[-max(1, len(finite) // 10):]
    best = min(finite) if finite else float("nan")
    final = statistics.fmean(tail) if tail else float("nan")
    diverged = len(finite) < len(losses) or not finite or final > 10 * best
    return {"loss_final": final, "loss_best": best, "diverged": diverged}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "toy2d.yaml"))
    ap.add_argument("--settings", default="grid:0:1e-4,grid:0:1e-3,grid:3:1e-3",
                    help="comma-separated mode:window_substeps:lr, mode = grid or polynomial (or gm with --iters 0)")
    ap.add_argument("--train-seeds", default="0", help="comma-separated run.seed values")
    ap.add_argument("--iters", type=int, default=2000,
                    help="pi-ID iterations per run; 0 = only the gradient concentration at init, over --probes "
                         "batches per setting (no training)")
    ap.add_argument("--probes", type=int, default=3, help="noise batches of the init-only measurement")
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--seeds", type=int, default=3, help="sampling seeds")
    ap.add_argument("--floor-pairs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "toy2d_dx.json"))
    ap.add_argument("--merge-toy2d", default="", metavar="JSON",
                    help="also merge the seed-0, window-3 rows into this toy2d.py result file as its dx4 (grid) and "
                         "dxp4 (polynomial) rows and bars (the same protocol as `toy2d.py --methods dx4,dxp4`)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    base = load_config(args.config, ["eval.every=0", "run.output=runs/toy2d_dx"])
    teacher = build_teacher(base, build_family(base))
    sets = None  # drawn (or read from the cache) after the first training, when another process may have cached them
    probe = to_image(torch.randn(args.samples, 2, generator=torch.Generator().manual_seed(99)))
    rows = []
    if args.iters == 0:
        return init_study(args, base, teacher, probe)
    for setting in args.settings.split(","):
        mode, window, lr = setting.split(":")
        for seed in (int(s) for s in args.train_seeds.split(",")):
            cfg = with_overrides(base, policy={"type": "dx", "dx_mode": mode}, train={"iters": args.iters},
                                 distill={"window_substeps": float(window)}, optim={"lr": float(lr)},
                                 run={"seed": seed, "output": f"runs/toy2d_dx/{mode}_w{window}_lr{lr}_s{seed}"})
            params = piid_params(cfg)
            d = cfg.distill
            init = gradient_concentration(build_family(cfg).build_student(cfg, teacher).make_policy, teacher,
                                          probe[:cfg.train.batch_size], params)
            run, seconds = distill(cfg)
            with run.ema.applied():
                end = gradient_concentration(run.student.make_policy, teacher, probe[:cfg.train.batch_size], params)
                profile = velocity_error_profile(run.student.make_policy, teacher, probe[:1024], d.nfe,
                                                 d.final_step_scale, d.shift, d.total_substeps)
            if sets is None:
                sets = teacher_sets(teacher, args.samples, args.floor_pairs,
                                    cache=teacher_sets_cache(base, args.samples, args.floor_pairs))
            quality = evaluate(f"DX {mode}", d.nfe, student_sampler(run, 1.0, cfg), sets, args.seeds, args.samples)
            quality.train_iters, quality.train_seconds = args.iters, seconds
            row = {"mode": mode, "window_substeps": float(window), "lr": float(lr), "seed": seed,
                   "iters": args.iters, "train_seconds": round(seconds, 1), **loss_summary(run.metrics_path),
                   "init": init, "end": end, "velocity_rms_by_sigma": profile, "ed": quality.ed,
                   "ed_over_floor": quality.ed_over_floor, "off_mode": quality.off_mode,
                   "modes_covered": quality.modes_covered, "quality": dict(quality.__dict__)}
            rows.append(row)
            print(format_row(row), flush=True)
    print("\n" + "\n".join(format_table(rows)))
    meta = {"command": " ".join(["benchmarks/toy2d_dx.py", *(argv if argv is not None else sys.argv[1:])]),
            "samples": args.samples, "seeds": args.seeds, "floor_pairs": args.floor_pairs, "ed_noise_floor": sets.floor,
            "machine": platform.processor() or platform.machine(), "seconds": round(time.perf_counter() - t_start, 1)}
    write_rows(Path(args.out), rows, meta)
    if args.merge_toy2d:
        merge_into_toy2d(Path(args.merge_toy2d), rows, sets.floor, meta)
    print(f"\nwrote {args.out} ({meta['seconds']} s)")
    return 0


def _joined(probes: list[dict], key: str) -> str:
    return ", ".join(f"{p[key]:.2f}" for p in probes)


def init_study(args, base, teacher, probe) -> int:
    """Gradient concentration of the freshly initialised DX student, per setting, over several noise batches."""
    rows = []
    for setting in args.settings.split(","):
        mode, window, _ = setting.split(":")
        policy = {"type": "gm"} if mode == "gm" else {"type": "dx", "dx_mode": mode}
        cfg = with_overrides(base, policy=policy, distill={"window_substeps": float(window)})
        torch.manual_seed(cfg.run.seed)
        student = build_family(cfg).build_student(cfg, teacher)
        B = cfg.train.batch_size
        probes = [gradient_concentration(student.make_policy, teacher,
                                         to_image(torch.randn(B, 2, generator=torch.Generator().manual_seed(100 + i))),
                                         piid_params(cfg), seed=i) for i in range(args.probes)]
        rows.append({"mode": mode, "window_substeps": float(window), "probes": probes,
                     **{k: statistics.fmean(p[k] for p in probes) for k in ("top1", "ess")},
                     "min_sigma": min(p["min_sigma"] for p in probes)})
    lines = ["| mode | window | smallest query sigma | top-1 sample's share of the squared gradient (per batch) | "
             "effective samples / batch (per batch) |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['mode']} | {r['window_substeps']:g} | {r['min_sigma']:.1e} | "
              f"{_joined(r['probes'], 'top1')} | {_joined(r['probes'], 'ess')} |" for r in rows]
    print("\n".join(lines))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        old = json.loads(path.read_text()) if path.exists() else {"rows": [], "runs": []}
        old["init"] = {"command": " ".join(["benchmarks/toy2d_dx.py", *sys.argv[1:]]), "batch": base.train.batch_size,
                       "rows": rows}
        path.write_text(json.dumps(old, indent=2))
    print(f"\nwrote {path}")
    return 0


def merge_into_toy2d(path: Path, rows: list[dict], floor: float, meta: dict) -> None:
    from trainer.evaluation.toy2d import MethodResult, bars

    results = {}
    for r in rows:
        if r["seed"] != 0 or r["window_substeps"] != DX_WINDOW:
            continue
        key = "dx4" if r["mode"] == "grid" else "dxp4"
        q = dict(r["quality"], key=key)
        q["method"] = (f"DX pi-ID {r['mode']} ({'N' if r['mode'] == 'grid' else 'P'}=10, window {DX_WINDOW:g}, "
                       f"lr {r['lr']:g})")
        results[key] = MethodResult(**q)
    if results:
        merge_json(path, list(results.values()), bars(results, floor, 8), dict(meta, ed_noise_floor=floor))
        print(f"merged {sorted(results)} into {path}")


def _key(r: dict) -> tuple:
    return (r["mode"], r["window_substeps"], r["lr"], r["seed"], r["iters"])


def write_rows(path: Path, rows: list[dict], meta: dict) -> None:
    """Merge `rows` into the JSON at `path` (a row with the same setting, seed and iterations is replaced), so
    settings measured by separate invocations end up in one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        _write_rows(path, rows, meta)


def _write_rows(path: Path, rows: list[dict], meta: dict) -> None:
    old = json.loads(path.read_text()) if path.exists() else {"rows": [], "runs": []}
    new_keys = {_key(r) for r in rows}
    merged = [r for r in old.get("rows", []) if _key(r) not in new_keys] + rows
    merged.sort(key=lambda r: (r["mode"], r["window_substeps"], -r["lr"], r["seed"]))
    path.write_text(json.dumps({"runs": old.get("runs", []) + [meta], "rows": merged}, indent=2))


def format_row(r: dict) -> str:
    v = " | ".join(f"{x:.3g}" for x in r["velocity_rms_by_sigma"].values())
    return (f"| {r['mode']} | {r['window_substeps']:g} | {r['lr']:g} | {r['seed']} | {r['init']['min_sigma']:.1e} | "
            f"{r['init']['top1']:.2f} / {r['end']['top1']:.2f} | {r['init']['ess']:.2f} / {r['end']['ess']:.2f} | "
            f"{v} | {r['loss_final']:.3g} | {'yes' if r['diverged'] else 'no'} | {r['ed_over_floor']:.2f} | "
            f"{r['off_mode']:.4f} |")


def format_table(rows: list[dict]) -> list[str]:
    bins = " | ".join(f"vel. RMS sigma {k[6:]}" for k in rows[0]["velocity_rms_by_sigma"]) if rows else ""
    return [f"| mode | window | lr | seed | min query sigma | top-1 grad share init / end | ESS init / end | {bins} | "
            "final loss | diverged | ED / floor | off-mode |",
            "| --- " * (11 + len(SIGMA_BINS) - 1) + "|"] + [format_row(r) for r in rows]


if __name__ == "__main__":
    sys.exit(main())
