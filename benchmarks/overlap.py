"""Overlap benchmark: step time with `teacher.overlap` on vs off, and the teacher-wait fraction.

One local Ray, one TeacherServer actor (its own process: the separate placement) holding a tiny FLUX teacher
of the SAME architecture and size as the student, and one student rank in this process (torch engine, LoRA +
GM head, data-free pi-ID). Both modes run side by side in one run, alternating, with the same seeds.
Ideal: with teacher cost T and student cost S per segment, sequential ~ S + T, overlapped ~ max(S, T) plus
what cannot overlap (the last segment's wait, rollouts), so the best ratio here is about 0.5-0.6.

    .venv/bin/python benchmarks/overlap.py [--iters 6] [--latent 16] [--batch 4]

Writes benchmarks/results/overlap.json and prints a table. Timings on shared CPUs are noisy: report medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_cfg(teacher_dir: str, latent: int, batch: int, overlap: bool, iters: int) -> dict:
    return {
        "model": {"family": "flux", "pretrained": teacher_dir, "latent_channels": 4, "latent_size": latent},
        "policy": {"num_components": 2, "logstd_inner_dim": 16},
        "lora": {"enabled": True, "rank": 4, "alpha": 4.0, "dropout": 0.0,
                 "target_modules": ["to_q", "to_k", "to_v", "proj_mlp"]},
        "distill": {"nfe": 4, "num_intermediate": 2, "total_substeps": 32},
        "teacher": {"placement": "separate", "overlap": overlap, "cpus_per_replica": 0.0, "batch_wait_ms": 0.0,
                    "guidance": {"mode": "embedded", "scale": 3.5}},
        "train": {"engine": "torch", "batch_size": batch, "iters": iters},
        "optim": {"warmup_iters": 0, "grad_clip_start": 0},
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the student and the teacher")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overlap.json"))
    args = ap.parse_args()

    import ray

    from cluster.teacher_server import RemoteTeacher, TeacherServer
    from models.families import get_family
    from trainer.config import config_from_dict
    from trainer.distributed import RankInfo
    from trainer.loop import train_loop
    from trainer.rank_program import build_rank, iteration_for, synthetic_batches

    torch.set_num_threads(args.threads)
    cond_shapes = {"prompt_embeds": [8, 32], "pooled_prompt_embeds": [32]}
    tmp = Path(tempfile.mkdtemp(prefix="piflow_overlap_"))
    base = config_from_dict(make_cfg("", args.latent, args.batch, True, args.iters) | {"model": {
        "family": "flux", "tiny": True, "latent_channels": 4, "latent_size": args.latent}})
    get_family("flux").load_network(base).save_pretrained(tmp / "teacher" / "transformer")
    teacher_dir = str(tmp / "teacher")

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    env = {"env_vars": {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}}
    server = ray.remote(TeacherServer).options(num_cpus=0, max_concurrency=64, runtime_env=env).remote(
        make_cfg(teacher_dir, args.latent, args.batch, True, args.iters), 256, 0.0)
    ray.get(server.ping.remote())
    rows = {}
    try:
        for overlap in (False, True, False, True):  # alternate: both modes see the same machine load
            cfg = config_from_dict(make_cfg(teacher_dir, args.latent, args.batch, overlap, args.iters + 1))
            setup = build_rank(cfg, RemoteTeacher([server]))
            records = []

            class Collect:
                def log(self, step, values):
                    records.append(values)

            train_loop(cfg, setup.engine, setup.student.make_policy, setup.teacher,
                       synthetic_batches(cfg, RankInfo(0, 1, 0), cond_shapes), ema=setup.ema, logger=Collect(),
                       generator=torch.Generator().manual_seed(0), progress=False, iteration=iteration_for(cfg))
            row = rows.setdefault("on" if overlap else "off", {"step_s": [], "teacher_wait_frac": [], "loss": []})
            for r in records[1:]:  # the first iteration warms up
                row["step_s"].append(r["time/step"])
                row["teacher_wait_frac"].append(r["time/teacher_wait_frac"])
                row["loss"].append(r["loss"])
        teacher_stats = ray.get(server.stats.remote())
    finally:
        ray.shutdown()

    # the teacher's cost per segment vs the student's: one forward of n_int*B vs one of B (+ its backward)
    result = {"config": vars(args), "teacher_mean_compute_s": teacher_stats["mean_compute_s"], "modes": {}}
    for mode, row in rows.items():
        result["modes"][mode] = {
            "step_s_median": statistics.median(row["step_s"]),
            "teacher_wait_frac_median": statistics.median(row["teacher_wait_frac"]),
            "n": len(row["step_s"]),
            "step_s": row["step_s"],
        }
    # weights and random streams are the same in both modes, so the losses must be too
    pairs = zip(rows["on"]["loss"], rows["off"]["loss"])
    result["max_loss_rel_diff_on_vs_off"] = max(abs(a - b) / abs(b) for a, b in pairs)
    on, off = result["modes"]["on"]["step_s_median"], result["modes"]["off"]["step_s_median"]
    result["ratio_on_over_off"] = on / off
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'mode':<8}{'step s (median)':>18}{'teacher-wait frac':>20}{'n':>5}")
    for mode in ("off", "on"):
        m = result["modes"][mode]
        print(f"{mode:<8}{m['step_s_median']:>18.3f}{m['teacher_wait_frac_median']:>20.3f}{m['n']:>5}")
    print(f"overlap on / off step time: {result['ratio_on_over_off']:.3f}; max loss difference on vs off: "
          f"{result['max_loss_rel_diff_on_vs_off']:.1e} relative  -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
