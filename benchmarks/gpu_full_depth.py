"""Full-depth FLUX.1-dev pi-Flow on one GPU, measured stage by stage (issue 23 item 8).

The real FLUX.1-dev transformer (19 double + 38 single blocks, hidden 3072, T5 width 4096, RoPE (16, 56, 56)) at
1024^2 (4096 image + 512 text tokens) with random weights constructed directly in bf16 on the GPU (under the
trainer's `deepspeed.zero.Init`; nothing is downloaded), LoRA rank 256 on the recipe's targets, the GM head
K = 8, activation checkpointing on, built and stepped by the trainer's own code (`benchmarks/gpu_step.py`
`build_rank_student`: `build_partitioned_student` + the ZeRO-3 engine on one rank, `train_loop` for the
iteration). Stages, each written to the JSON as soon as it ends (a timeout keeps what finished; a failing
stage is recorded and the next one runs):

  matmul     the card's bf16 matmul rate (8192^3, median of 20): the ceiling the utilisations are measured against
  attention  every attention backend of diffusers' dispatcher at FLUX shape (batch 2, 24 heads x 128, 4608
             tokens), forward and forward + backward, each in its own process (a kernel crash ends only that probe)
  build      construct the student (and its shared teacher: the LoRA base with the adapters off)
  teacher    teacher forward TFLOP/s at batch 2 and 8 (FLOPs counted by FlopCounterMode on the same call)
  student    student forward + backward model TFLOP/s (counted FLOPs minus the recomputed forward of
             checkpointing) and hardware TFLOP/s (recompute included), peak memory of a step with its optimiser
  iteration  one full data-free iteration at 2 prompts per GPU through `train_loop` (4 segments, n_int = 4),
             r = 0 and r = 0.5, split by phase (student forward, teacher, backward, optimiser, rollout/other);
             each phase ends with a device synchronisation so the split is of GPU time
  compiled   the same student step and teacher forward with `train.compile: inductor` (regional compilation)

    python benchmarks/gpu_full_depth.py             # CUDA, default budget 450 s (one H100/H200: <= 8 minutes)
    python benchmarks/gpu_full_depth.py --tiny      # CPU: the tiny FLUX config, every stage but `compiled`

Prints one table and writes JSON: on a GPU to benchmarks/results/gpu_full_depth.json; `--tiny` or a CPU run to a
temporary file (never over committed GPU figures); `--out` anywhere. `--set key=value` passes config overrides
(e.g. a frozen-weight placement) to the recipe.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_step import (DATASHEET_BF16_TFLOPS, build_rank_student, conditioning,  # noqa: E402
                                 default_out, frozen_buffers, matmul_tflops, policy_loss, recipe_config, timed)

STAGES = ("matmul", "attention", "build", "teacher", "student", "iteration", "compiled")
# seconds a stage needs at least (GPU); a stage that would start later than budget - reserve is skipped
RESERVE = {"matmul": 10, "attention": 60, "build": 90, "teacher": 20, "student": 30, "iteration": 60,
           "compiled": 150}
ATTENTION_BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "_native_math", "flash",
                      "_flash_3", "flex")


# ------------------------------------------------------------------------------------------ attention probe
def probe_attention(backend: str, batch: int, tokens: int, heads: int, head_dim: int) -> dict:
    """One attention call through diffusers' dispatcher with `backend` (run in a child process)."""
    from diffusers.models.attention_dispatch import (AttentionBackendName, _check_attention_backend_requirements,
                                                     dispatch_attention_fn)

    name = AttentionBackendName(backend)
    _check_attention_backend_requirements(name)  # a missing package says so, instead of failing inside the call
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(batch, tokens, heads, head_dim, generator=g).to(device, dtype).requires_grad_(True)
               for _ in range(3))

    def fwd():
        return dispatch_attention_fn(q, k, v, backend=name)

    def fwd_bwd():
        fwd().float().square().mean().backward()

    repeat = 10 if device.type == "cuda" else 2
    t_fwd = statistics.median(timed(lambda: fwd(), device, 2, repeat))
    t_all = statistics.median(timed(fwd_bwd, device, 2, repeat))
    with torch.no_grad():
        out = fwd().float()
        ref = dispatch_attention_fn(q, k, v, backend=AttentionBackendName("_native_math")).float()
    flops = 4 * batch * heads * tokens ** 2 * head_dim  # QK^T and PV; a backward counts 2.5x (FlashAttention-2)
    return {"backend": backend, "ok": True, "fwd_ms": 1e3 * t_fwd, "fwd_bwd_ms": 1e3 * t_all,
            "fwd_tflops": flops / t_fwd / 1e12, "fwd_bwd_tflops": 3.5 * flops / t_all / 1e12,
            "max_abs_diff_vs_math": float((out - ref).abs().max())}


def attention_stage(args, ctx: dict) -> dict:
    shape = (2, 16 + 8, 2, 16) if args.tiny else (2, 4096 + 512, 24, 128)  # (batch, tokens, heads, head dim)
    rows = {}
    # tiny (the suite, on a CPU): one working backend, the reference, and one whose package is missing
    for backend in ("native", "_native_math", "flash") if args.tiny else ATTENTION_BACKENDS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--probe-attention", backend,
               "--probe-shape", ",".join(map(str, shape))]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120 if not args.tiny else 300)
        except subprocess.TimeoutExpired:
            rows[backend] = {"ok": False, "error": "timed out"}
            continue
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode == 0 and lines:
            rows[backend] = json.loads(lines[-1])
        else:  # a missing package, an unsupported shape, or a crashed kernel (the exit code says which)
            tail = (done.stderr.strip().splitlines() or [""])[-1]
            rows[backend] = {"ok": False, "returncode": done.returncode, "error": tail[-500:]}
    return {"shape": {"batch": shape[0], "tokens": shape[1], "heads": shape[2], "head_dim": shape[3]},
            "backends": rows}


# --------------------------------------------------------------------------------------------- the model
class Synced:
    """`fn` followed by a device synchronisation: the loop's phase timer then measures GPU time, not launches."""

    def __init__(self, fn, device: torch.device):
        self.fn, self.device = fn, device

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return out


class SyncedEngine:
    def __init__(self, engine, device: torch.device):
        self.engine, self.device = engine, device
        self.backward, self.step = Synced(engine.backward, device), Synced(engine.step, device)

    def __getattr__(self, name):
        return getattr(self.__dict__["engine"], name)


def build_stage(args, ctx: dict) -> dict:
    from models.families import get_family
    from models.families.flux import FLUX_DEV_CONFIG

    family = get_family("flux")
    overrides = [f"model.latent_size={args.resolution // 8}", f"model.max_sequence_length={args.text_tokens}",
                 "model.gradient_checkpointing=true", f"train.batch_size={args.batch}",
                 f"train.precision={args.precision}", f"model.attention_backend={args.attention}", *args.set]
    if args.tiny:
        overrides += ["lora.rank=4", "lora.alpha=4.0", "policy.logstd_inner_dim=16", "model.latent_channels=4"]
    cfg = recipe_config(overrides)
    conf = family.tiny_config(cfg) if args.tiny else dict(FLUX_DEV_CONFIG)
    t0 = time.perf_counter()
    student, teacher, engine = build_rank_student(cfg, conf)  # the family turns checkpointing on, as the recipe
    sync(ctx["device"])
    ctx.update(cfg=cfg, family=family, conf=conf, student=student, teacher=teacher, engine=engine)
    numel = lambda ps: sum(getattr(p, "ds_numel", p.numel()) for p in ps)  # noqa: E731 (ZeRO-3: full sizes)
    out = {"seconds": time.perf_counter() - t0, "blocks": {"double": conf["num_layers"],
           "single": conf["num_single_layers"]},
           "parameters": numel(student.parameters()) + numel(frozen_buffers(student, engine)),
           "trainable_parameters": numel(engine.params), "lora_rank": cfg.lora.rank, "K": cfg.policy.num_components,
           "checkpointing": True, "precision": cfg.train.precision, "attention": cfg.model.attention_backend}
    if ctx["device"].type == "cuda":
        out["memory_allocated_gib"] = torch.cuda.memory_allocated() / 2 ** 30
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def inputs(ctx: dict, batch: int, seed: int):
    cfg, family, device = ctx["cfg"], ctx["family"], ctx["device"]
    C, H, W = family.latent_shape(cfg)
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, C, H, W, generator=g).to(device)
    sigma = torch.rand(batch, generator=g).to(device)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    return x, sigma, conditioning(cfg, ctx["conf"], batch, device, dtype)


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def teacher_stage(args, ctx: dict) -> dict:
    out = {}
    for batch in (2, 8):
        x, sigma, cond = inputs(ctx, batch, seed=batch)
        call = lambda: ctx["teacher"](x, sigma, cond)  # noqa: E731
        secs = statistics.median(timed(call, ctx["device"], ctx["warmup"], ctx["repeat"]))
        flops = flops_of(call)
        out[f"batch_{batch}"] = {"seconds": secs, "tflop": flops / 1e12, "tflops": flops / secs / 1e12,
                                 "mfu_vs_matmul": flops / secs / 1e12 / ctx["matmul"] if ctx.get("matmul") else None}
    return out


def student_stage(args, ctx: dict) -> dict:
    student, engine, device = ctx["student"], ctx["engine"], ctx["device"]
    x, sigma, cond = inputs(ctx, args.batch, seed=1)
    sigma = torch.ones_like(sigma)

    def fwd_bwd():
        engine.backward(policy_loss(student.make_policy(x, sigma, cond)))

    def fwd():
        with torch.no_grad():
            student.make_policy(x, sigma, cond)

    secs = statistics.median(timed(fwd_bwd, device, ctx["warmup"], ctx["repeat"]))
    engine.step()
    hw = flops_of(fwd_bwd)  # with checkpointing: forward + recomputed forward + backward
    engine.step()
    fwd_flops = flops_of(fwd)
    model = hw - fwd_flops  # the recomputed forward is the blocks' forward: all but embeddings and the head
    out = {"seconds": secs, "model_tflop": model / 1e12, "hardware_tflop": hw / 1e12, "forward_tflop": fwd_flops / 1e12,
           "model_tflops": model / secs / 1e12, "hardware_tflops": hw / secs / 1e12, "batch": args.batch}
    if ctx.get("matmul"):
        out["mfu_vs_matmul"] = out["model_tflops"] / ctx["matmul"]
    if device.type == "cuda":
        sync(device)
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        engine.step()
        sync(device)
        out.update(memory_static_gib=static / 2 ** 30, memory_peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
    return out


def iteration_stage(args, ctx: dict) -> dict:
    """One measured data-free iteration (after one warm-up) per teacher ratio, through the trainer's loop."""
    from models.sample_rng import SampleRNG
    from trainer.loop import train_loop

    cfg, device = ctx["cfg"], ctx["device"]
    engine = SyncedEngine(ctx["engine"], device)
    make_policy = Synced(ctx["student"].make_policy, device)
    teacher = Synced(ctx["teacher"], device)
    teacher.forwards = 0  # read by the loop's counter (the Synced wrapper hides the teacher's own)
    out = {}

    def batches():
        step = 0
        while True:
            x, _, cond = inputs(ctx, args.batch, seed=100 + step)
            yield x.float(), cond
            step += 1

    for name, decay in (("r0", 0), ("r0.5", 2)):
        # r(it) = 1 - it / D: iteration 1 of D = 2 runs at r = 0.5; iteration 0 (r = 1 or 0) warms up
        cfg.distill.teacher_ratio_decay_iters = decay
        cfg.train.iters = 2
        records = []

        class Log:
            def log(self, step, values):
                records.append(values)

        before = ctx["teacher"].forwards
        train_loop(cfg, engine, make_policy, teacher, batches(), logger=Log(), progress=False,
                   sample_rng=lambda it: SampleRNG(cfg.run.seed, [it * args.batch + p for p in range(args.batch)]))
        rec = records[-1]
        out[name] = {"teacher_ratio": rec["teacher_ratio"], "step_s": rec["time/step"],
                     "phases_s": {k.removeprefix("time/"): v for k, v in rec.items()
                                  if k.startswith("time/") and k not in ("time/step", "time/teacher_wait_frac")},
                     "teacher_calls": rec["teacher/calls"], "loss": rec["loss"],
                     "teacher_forwards_both_iterations": ctx["teacher"].forwards - before}
    return out


def compiled_stage(args, ctx: dict) -> dict:
    from models.families.base import compile_blocks

    backend = "aot_eager" if args.tiny else "inductor"
    t0 = time.perf_counter()
    n = compile_blocks(ctx["student"].transformer, backend=backend)  # the trunk: student and shared teacher
    ctx["warmup"] = max(ctx["warmup"], 2)  # the first calls compile
    out = {"backend": backend, "blocks": n, "student": student_stage(args, ctx), "teacher": teacher_stage(args, ctx)}
    out["seconds_with_compilation"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------------------------------- main
def table(result: dict) -> list[tuple[str, str]]:
    s = result["stages"]
    rows = []
    f = lambda v, spec=".1f": format(v, spec) if isinstance(v, (int, float)) else "n/a"  # noqa: E731
    if "tflops" in s.get("matmul", {}):
        rows.append((f"matmul {s['matmul']['n']}^3 (TFLOP/s)", f(s["matmul"]["tflops"], ".0f")))
    for name, row in s.get("attention", {}).get("backends", {}).items():
        rows.append((f"attention {name} fwd+bwd (ms)", f(row.get("fwd_bwd_ms")) if row.get("ok") else "failed"))
    for b in (2, 8):
        row = s.get("teacher", {}).get(f"batch_{b}", {})
        rows.append((f"teacher fwd batch {b} (TFLOP/s)", f(row.get("tflops"), ".0f")))
    st = s.get("student", {})
    rows += [("student fwd+bwd model TFLOP/s", f(st.get("model_tflops"), ".0f")),
             ("student step peak memory (GiB)", f(st.get("memory_peak_gib")))]
    for name in ("r0", "r0.5"):
        it = s.get("iteration", {}).get(name, {})
        rows.append((f"iteration {name}, 2 prompts (s)", f(it.get("step_s"), ".2f")))
    comp = s.get("compiled", {})
    rows.append(("compiled student model TFLOP/s", f(comp.get("student", {}).get("model_tflops"), ".0f")))
    rows.append(("compiled teacher batch 8 TFLOP/s", f(comp.get("teacher", {}).get("batch_8", {}).get("tflops"), ".0f")))
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny FLUX on the CPU: checks the script (the test suite)")
    ap.add_argument("--resolution", type=int, default=0, help="image side (default 1024; tiny 64)")
    ap.add_argument("--text-tokens", type=int, default=0, help="T5 tokens (default 512; tiny 8)")
    ap.add_argument("--batch", type=int, default=2, help="prompts per GPU (the recipe: 2)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="", help="default bf16 (tiny on CPU: fp32)")
    ap.add_argument("--attention", default="auto", help="model.attention_backend of the model stages")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds; a stage that would overrun is skipped")
    ap.add_argument("--repeat", type=int, default=0, help="timed repetitions (default 5 on GPU, 1 on CPU)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--out", default="", help="JSON path (default: results/ on a GPU, else a temp file)")
    ap.add_argument("--probe-attention", default="", help=argparse.SUPPRESS)  # the child process of a probe
    ap.add_argument("--probe-shape", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe_attention:
        print(json.dumps(probe_attention(args.probe_attention, *map(int, args.probe_shape.split(",")))))
        return {}

    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("gpu_full_depth: no CUDA device: run with --tiny (the CPU check), or on a GPU machine")
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"gpu_full_depth: --stages: unknown {unknown} (expected {', '.join(STAGES)})")
    args.resolution = args.resolution or (64 if args.tiny else 1024)
    args.text_tokens = args.text_tokens or (8 if args.tiny else 512)
    args.precision = args.precision or ("fp32" if args.tiny and device.type != "cuda" else "bf16")
    out_path = Path(args.out or default_out("gpu_full_depth.json", device.type == "cuda" and not args.tiny))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "tiny": args.tiny, "resolution": args.resolution,
              "text_tokens": args.text_tokens, "batch": args.batch, "budget_s": args.budget, "overrides": args.set,
              "datasheet_bf16_tflops": next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None),
              "stages": {}}
    ctx = {"device": device, "repeat": args.repeat or (5 if device.type == "cuda" else 1),
           "warmup": 2 if device.type == "cuda" else 1}
    runners = {"attention": attention_stage, "build": build_stage, "teacher": teacher_stage,
               "student": student_stage, "iteration": iteration_stage, "compiled": compiled_stage}
    for stage in stages:
        left = args.budget - (time.perf_counter() - t_start)
        if device.type == "cuda" and left < RESERVE[stage]:
            result["stages"][stage] = {"skipped": f"budget: {left:.0f} s left, the stage needs ~{RESERVE[stage]} s"}
        elif stage != "matmul" and stage != "attention" and stage != "build" and "student" not in ctx:
            result["stages"][stage] = {"skipped": "the model was not built"}
        else:
            t0 = time.perf_counter()
            try:
                if stage == "matmul":
                    n = 8192 if device.type == "cuda" else 256
                    ctx["matmul"] = matmul_tflops(device, n, 20 if device.type == "cuda" else 2)
                    result["stages"][stage] = {"n": n, "tflops": ctx["matmul"]}
                else:
                    result["stages"][stage] = runners[stage](args, ctx)
            except Exception as e:  # recorded; the next stage still runs (an OOM frees its tensors on the way out)
                result["stages"][stage] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            result["stages"][stage]["stage_s"] = time.perf_counter() - t0
        result["elapsed_s"] = time.perf_counter() - t_start
        out_path.write_text(json.dumps(result, indent=1))  # after every stage: a timeout keeps what finished
        print(f"[{result['elapsed_s']:6.0f} s] {stage}: "
              f"{'error' if 'error' in result['stages'][stage] else result['stages'][stage].get('skipped', 'done')}",
              flush=True)
    rows = table(result)
    print(f"{name}: FLUX.1-dev {'tiny' if args.tiny else '19+38 blocks'}, {args.resolution}^2, batch {args.batch}, "
          f"LoRA r{result['stages'].get('build', {}).get('lora_rank', '?')}, K=8, checkpointing, {args.precision}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v:>10}")
    print(f"wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
