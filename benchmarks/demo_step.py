"""The demo's data-free student step, measured in units that do not depend on the machine's load (issue 24):

    .venv/bin/python benchmarks/demo_step.py                        # this checkout
    .venv/bin/python benchmarks/demo_step.py --tree /tmp/old        # another checkout, e.g. `git archive C | tar -x`
    .venv/bin/python benchmarks/demo_step.py --tree /tmp/old --tree .   # side by side, alternating, --repeats times

`make demo`'s data-free student (configs/digits_demo.yaml: digits FLUX student, GM K=8, 4 NFE, batch 32) runs
through the real rank program (`trainer.rank_program.run_rank`) on 2 gloo ranks, ZeRO-3 as in the demo; only Ray
and the TeacherServer are left out (each rank queries a local copy of the teacher, timed apart from the student).
Per step, after `--warmup` steps, it reports rank 0's CPU seconds (this thread's `time.thread_time`, which
another process's load does not inflate the way it inflates wall time) of the student forwards, the backwards and
the whole step; the number of student forwards and backwards; the collectives (calls and bytes by kind); every
step's loss (with several trees or repeats, the largest relative difference to the first row); and,
from one plain (non-ZeRO) student, its trainable parameter count and the FLOPs of one forward + backward
(`torch.utils.flop_counter.FlopCounterMode`). Writes benchmarks/results/demo_step.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COND_SHAPES = {"prompt_embeds": [8, 32], "pooled_prompt_embeds": [32]}  # the digits text encoders' outputs
COLLECTIVES = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "broadcast", "all_gather",
               "reduce_scatter", "barrier", "all_to_all_single")


def _rank_main(rank: int, world: int, port: int, tree: str, out: str, iters: int, engine: str, queue) -> None:
    """One rank (spawned): the demo config's data-free training through run_rank, with counters installed."""
    import traceback

    try:
        queue.put((rank, _rank_program(rank, world, port, tree, out, iters, engine)))
    except BaseException:  # the parent reports it instead of waiting for a result that never comes
        queue.put((rank, {"error": traceback.format_exc()}))


def _rank_program(rank: int, world: int, port: int, tree: str, out: str, iters: int, engine: str) -> dict:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                      WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="")
    import types

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import trainer.engine as engine_mod
    import trainer.loop as loop
    import trainer.torch_engine as torch_engine_mod
    from models.families import get_family
    from trainer.config import load_config
    from trainer.rank_program import run_rank

    persist = int(os.environ.get("DEMO_STEP_PERSISTENCE", "0"))
    if persist:  # probe only (--zero-persistence): ZeRO-3 keeps parameters below this size gathered
        make_config = engine_mod.deepspeed_config

        def persistent_config(cfg, world_size):
            ds = make_config(cfg, world_size)
            ds["zero_optimization"].update(stage3_param_persistence_threshold=persist,
                                           stage3_model_persistence_threshold=2**62)
            return ds
        engine_mod.deepspeed_config = persistent_config
    loop.time = types.SimpleNamespace(perf_counter=time.thread_time)  # the loop's phase timers: this thread's CPU
    calls = {name: [0, 0] for name in COLLECTIVES}  # name -> [calls, bytes]

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            c = calls[name]
            c[0] += 1
            # the full tensor of the collective (gathered output, scattered input, reduced tensor)
            c[1] += max((a.numel() * a.element_size() for a in (*args, *kwargs.values())
                         if isinstance(a, torch.Tensor)), default=0)
            return fn(*args, **kwargs)
        return wrapper

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, counted(name, getattr(dist, name)))
    per_step = []  # collective counters after each optimiser step
    forwards, backwards = [0], [0]
    for cls in (engine_mod.DeepSpeedEngine, torch_engine_mod.TorchEngine):
        step, bwd = cls.step, cls.backward

        def step_counted(self, *a, _step=step, **kw):
            result = _step(self, *a, **kw)
            per_step.append({k: list(v) for k, v in calls.items()} | {
                "forwards": forwards[0], "backwards": backwards[0], "wall": time.perf_counter()})
            return result

        def backward_counted(self, loss, _bwd=bwd):
            backwards[0] += 1
            return _bwd(self, loss)
        cls.step, cls.backward = step_counted, backward_counted

    cfg = load_config(Path(tree) / "configs" / "digits_demo.yaml",
                      [f"run.output={out}", f"train.iters={iters}", "eval.every=0", f"train.ckpt_every={iters}",
                       "run.force=true", "wandb.mode=disabled", f"train.engine={engine}"])
    if engine == "torch":  # a reference without ZeRO: each rank trains alone (no gradient sync), the logs still reduce
        dist.init_process_group("gloo")
    teacher = get_family(cfg.model.family).build_teacher(cfg)
    from models.student import TransformerStudent

    fwd = TransformerStudent.forward

    def forward_counted(self, *a, **kw):
        forwards[0] += 1
        return fwd(self, *a, **kw)
    TransformerStudent.forward = forward_counted
    t0, c0 = time.perf_counter(), time.thread_time()
    run_rank(cfg, teacher, cond_shapes=COND_SHAPES)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.thread_time() - c0, "per_step": per_step}


def plain_student_counts(tree: str) -> dict:
    """Trainable parameters and FLOPs of one student forward + backward (batch 16 = one rank's), no ZeRO."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models.families import get_family
    from trainer.config import load_config

    cfg = load_config(Path(tree) / "configs" / "digits_demo.yaml")
    family = get_family(cfg.model.family)
    trunk = family.pretrained_class(cfg).from_pretrained(str(Path(tree) / cfg.model.pretrained), subfolder="transformer") \
        if hasattr(family, "pretrained_class") else family.transformer_class.from_pretrained(
            str(Path(tree) / cfg.model.pretrained), subfolder="transformer")
    student = family.build_student(cfg, teacher=None, network=trunk)
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(16, 1, 8, 8, generator=g), torch.full((16,), 0.7)
    cond = {k: torch.randn(16, *s, generator=g) for k, s in COND_SHAPES.items()}
    with FlopCounterMode(display=False) as counter:
        out = student(x, sigma, cond)
        sum(o.float().sum() for o in out).backward()
    return {"trainable_params": sum(p.numel() for p in student.parameters() if p.requires_grad),
            "trainable_tensors": sum(1 for p in student.parameters() if p.requires_grad),
            "all_params": sum(p.numel() for p in student.parameters()),
            "fwd_bwd_flops_per_16": int(counter.get_total_flops())}


def measure(tree: str, iters: int, warmup: int, engine: str, persistence: int = 0) -> dict:
    """Run the 2 ranks of one measurement in fresh processes importing `tree` (PYTHONPATH)."""
    with tempfile.TemporaryDirectory() as tmp:
        script = (f"import sys; sys.path.insert(0, {tree!r}); sys.path.insert(1, {str(ROOT / 'benchmarks')!r});"
                  f"import demo_step; print('RESULT', __import__('json').dumps("
                  f"demo_step._measure_here({tree!r}, {iters}, {warmup}, {engine!r}, {tmp!r})))")
        env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1", DEMO_STEP_PERSISTENCE=str(persistence))
        done = subprocess.run([sys.executable, "-c", script], cwd=tree, env=env, capture_output=True, text=True)
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode != 0 or not line:
            raise RuntimeError(f"measurement in {tree} failed:\n{done.stderr[-3000:]}")
        return json.loads(line[0][len("RESULT "):])


def _measure_here(tree: str, iters: int, warmup: int, engine: str, tmp: str) -> dict:
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    world = 2
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, tree, tmp, warmup + iters, engine, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=1800) for _ in range(world))
    errors = [r["error"] for r in results.values() if "error" in r]
    if errors:
        for p in procs:
            p.kill()
        raise RuntimeError(f"a rank failed:\n{errors[0]}")
    for p in procs:
        p.join(timeout=30)
    recs = [json.loads(ln) for ln in open(Path(tmp) / "metrics.jsonl")]
    body = [r for r in recs if r["step"] > warmup]
    med = lambda key: statistics.median(r.get(key, 0.0) for r in body)  # noqa: E731
    steps = results[0]["per_step"]
    a, b = steps[warmup - 1], steps[-1]
    per = {k: [(b[k][0] - a[k][0]) / iters, (b[k][1] - a[k][1]) / iters] for k in COLLECTIVES if b[k][0]}
    return {"tree": tree, "engine": engine, "iters": iters, "warmup": warmup,
            "cpu_per_step_s": {"step": med("time/step"), "student_fwd": med("time/student_fwd"),
                               "backward": med("time/backward"), "optimizer": med("time/optimizer"),
                               "rest": med("time/rollout_other") + med("time/teacher_wait")},
            "wall_per_step_s": (b["wall"] - a["wall"]) / iters,
            "losses": [r["loss"] for r in recs],  # every step's (mean over ranks): equal across trees = same math
            "forwards_per_step": (b["forwards"] - a["forwards"]) / iters,
            "backwards_per_step": (b["backwards"] - a["backwards"]) / iters,
            "collectives_per_step": {k: {"calls": v[0], "bytes": v[1]} for k, v in per.items()},
            **plain_student_counts(tree)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", help="checkout(s) to measure (default: this one)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--engine", default="deepspeed", choices=["deepspeed", "torch"])
    ap.add_argument("--zero-persistence", type=int, default=0,
                    help="probe: ZeRO-3 stage3_param_persistence_threshold (the demo uses 0; the EMA swap relies "
                         "on it, and this run has no EMA swap)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_step.json"))
    args = ap.parse_args(argv)
    trees = [str(Path(t).resolve()) for t in (args.tree or [str(ROOT)])]
    rows = []
    for rep in range(args.repeats):
        for tree in trees:
            r = measure(tree, args.iters, args.warmup, args.engine, args.zero_persistence)
            r["zero_persistence"] = args.zero_persistence
            r["repeat"] = rep
            rows.append(r)
            c = r["cpu_per_step_s"]
            coll = r["collectives_per_step"]
            print(f"{tree} [{rep}]: CPU/step {c['step']:.3f} s (fwd {c['student_fwd']:.3f}, bwd {c['backward']:.3f},"
                  f" optimizer {c['optimizer']:.3f}, rest {c['rest']:.3f}), wall/step {r['wall_per_step_s']:.3f} s, "
                  f"{r['forwards_per_step']:.0f} fwd + {r['backwards_per_step']:.0f} bwd, collectives "
                  + ", ".join(f"{k} {v['calls']:.0f}x {v['bytes'] / 1e6:.2f} MB" for k, v in coll.items())
                  + f"; params {r['trainable_params']}, fwd+bwd {r['fwd_bwd_flops_per_16'] / 1e6:.1f} MFLOP/16",
                  flush=True)
    print("\n| tree | rank-0 CPU s/step | fwd | bwd | fwd/bwd calls | all-gathers/step | MB gathered/step "
          "| params | MFLOP fwd+bwd (16 samples) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        c, coll = r["cpu_per_step_s"], r["collectives_per_step"]
        ag = coll.get("all_gather_into_tensor", {"calls": 0, "bytes": 0})
        print(f"| {Path(r['tree']).name} | {c['step']:.3f} | {c['student_fwd']:.3f} | {c['backward']:.3f} | "
              f"{r['forwards_per_step']:.0f}/{r['backwards_per_step']:.0f} | {ag['calls']:.0f} | "
              f"{ag['bytes'] / 1e6:.2f} | {r['trainable_params']} | {r['fwd_bwd_flops_per_16'] / 1e6:.1f} |")
    for r in rows[1:]:
        diff = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(r["losses"], rows[0]["losses"]))
        print(f"{Path(r['tree']).name} [{r['repeat']}] vs {Path(rows[0]['tree']).name} [0]: max relative loss "
              f"difference over {len(r['losses'])} steps {diff:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "argv": sys.argv[1:]}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
