"""GPU step check (issue 13): one CUDA device, a FLUX.1-dev student at real width and reduced depth.

Measures, side by side in one run:
- student forward+backward (LoRA + GM head K=8, the recipe's trainables in bf16 as under ZeRO-3 bf16): time,
  FLOPs counted by torch's FlopCounterMode, and MFU against the device's dense bf16 peak;
- teacher forward throughput (the shared-placement teacher: the same trunk with adapters off, no_grad) at the
  pi-ID request size (micro-batch x n_int queries): samples/s and achieved TFLOP/s;
- the 128-substep GM rollout (network-free, sigma 1 -> 0) as a fraction of one student forward;
- peak memory of the student step (torch.cuda.max_memory_allocated) against `trainer/planner.py`'s model of the
  same parts (frozen base, trainable weights and grads, activations, shared-teacher forward; one GPU, no ZeRO).

    python benchmarks/gpu_step.py                 # CUDA: 1024^2, 2 double + 4 single FLUX blocks, batch 2
    python benchmarks/gpu_step.py --tiny          # CPU: tiny FLUX, the same code path (runs in the test suite)

Random weights (no downloads), eager PyTorch (no compilation). Prints one table and writes JSON
(`--out`, default benchmarks/results/gpu_step.json, or gpu_step_tiny.json with --tiny).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peaks (no sparsity), by device name (NVIDIA data sheets).
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 70.0,
               "L4": 121.0, "RTX 4090": 165.2}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny FLUX on CPU (the suite's smoke run)")
    ap.add_argument("--resolution", type=int, default=1024, help="image side in pixels (latent = /8)")
    ap.add_argument("--double", type=int, default=2, help="FLUX double-stream blocks (FLUX.1-dev has 19)")
    ap.add_argument("--single", type=int, default=4, help="FLUX single-stream blocks (FLUX.1-dev has 38)")
    ap.add_argument("--batch", type=int, default=2, help="micro-batch per GPU")
    ap.add_argument("--seq", type=int, default=512, help="T5 prompt tokens")
    ap.add_argument("--iters", type=int, default=5, help="timed repetitions (after 2 warm-ups)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak (default: from the name)")
    ap.add_argument("--out", default="", help="JSON path")
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --tiny for the CPU smoke run")
    return args


def build(args):
    """(cfg, family, student, device, dtype): the FLUX.1-dev recipe's student on a real-width reduced-depth trunk."""
    from diffusers import FluxTransformer2DModel

    from models.families import get_family
    from models.families.flux import FLUX_DEV_CONFIG
    from models.teacher import Teacher
    from trainer.config import load_config

    tiny = args.tiny
    overrides = ["model.pretrained=", f"model.tiny={str(tiny).lower()}", f"train.batch_size={args.batch}",
                 "cluster.student.workers=1", "train.micro_batch_size=0"]
    if tiny:
        overrides += ["model.latent_channels=4", "model.latent_size=8", "model.max_sequence_length=8",
                      "lora.rank=4", "lora.alpha=4", "policy.logstd_inner_dim=32"]
    else:
        overrides += [f"model.latent_size={args.resolution // 8}", f"model.max_sequence_length={args.seq}"]
    cfg = load_config(ROOT / "configs" / "flux_dev_gm_k8_4nfe.yaml", overrides)
    family = get_family("flux")
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    kwargs = family.tiny_config(cfg) if tiny else dict(FLUX_DEV_CONFIG, num_layers=args.double,
                                                       num_single_layers=args.single)
    torch.manual_seed(0)
    with torch.device(device):
        network = FluxTransformer2DModel(**kwargs).to(dtype)
    teacher = Teacher(family, cfg, None)
    student = family.build_student(cfg, teacher=teacher, network=network).to(device)
    for p in student.parameters():  # as DeepSpeed bf16 does: trainables are bf16 weights (fp32 masters aside)
        if p.requires_grad:
            p.data = p.data.to(dtype)
    return cfg, family, student, teacher, device, dtype


def inputs(cfg, args, device, dtype, batch: int):
    C, S = cfg.model.latent_channels, cfg.model.latent_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, C, S, S, generator=g).to(device)
    sigma = torch.full((batch,), 0.7, device=device)
    T = cfg.model.max_sequence_length
    D, P = (32, 32) if args.tiny else (4096, 768)
    cond = {"prompt_embeds": torch.randn(batch, T, D, generator=g).to(device, dtype),
            "pooled_prompt_embeds": torch.randn(batch, P, generator=g).to(device, dtype)}
    return x, sigma, cond


def timed(fn, iters: int, device) -> float:
    """Median seconds of fn() over `iters` runs after 2 warm-ups."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_tflops(args) -> float:
    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


def planned_step_gib(cfg, student, tokens: int, batch: int) -> dict[str, float]:
    """The planner's model of what one GPU holds for this step (no ZeRO, no optimiser): frozen base, trainable
    weights + grads, activations without checkpointing, the shared teacher's no_grad forward."""
    from types import SimpleNamespace

    from trainer.planner import ACT_INFER, BYTES, GiB, activation_bytes

    net = student.transformer
    counts = SimpleNamespace(hidden=student.head.proj_out_means.in_features,
                             num_blocks=len(net.transformer_blocks) + len(net.single_transformer_blocks))
    frozen = sum(p.numel() for p in student.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    teacher_batch = batch * cfg.distill.num_intermediate
    return {"frozen base": frozen * BYTES["frozen"] / GiB,
            "trainable weights + grads": trainable * (BYTES["weight"] + BYTES["grad"]) / GiB,
            "activations": activation_bytes(counts, tokens, batch, checkpointing=False) / GiB,
            "teacher forward": ACT_INFER * tokens * counts.hidden * teacher_batch / GiB}


def run(args) -> dict:
    from models.rollout import rollout

    torch.set_grad_enabled(True)
    cfg, family, student, teacher, device, dtype = build(args)
    B = args.batch
    x, sigma, cond = inputs(cfg, args, device, dtype, B)
    student.train()

    def fwd_bwd():
        means, logweights, logstd = student(x, sigma, cond)
        loss = means.square().mean() + logweights.mean() + logstd.mean()
        loss.backward()
        student.zero_grad(set_to_none=True)

    def fwd():
        with torch.no_grad():
            student(x, sigma, cond)

    n_int = cfg.distill.num_intermediate
    xq, sq, cq = inputs(cfg, args, device, dtype, B * n_int)

    def teacher_fwd():
        teacher(xq, sq, cq)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        measured_peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        measured_peak = float("nan")
    t_step = timed(fwd_bwd, args.iters, device)
    t_fwd = timed(fwd, args.iters, device)
    t_teacher = timed(teacher_fwd, args.iters, device)
    f_step, f_teacher = flops_of(fwd_bwd), flops_of(teacher_fwd)

    with torch.no_grad():
        policy = student.make_policy(x, sigma.float(), cond).detach()
    total = cfg.distill.total_substeps

    def gm_rollout():
        with torch.no_grad():
            rollout(policy, x.float(), 1.0, 0.0, cfg.distill.shift, total)

    t_rollout = timed(gm_rollout, args.iters, device)
    peak = peak_tflops(args)
    tokens = (cfg.model.latent_size // 2) ** 2 + cfg.model.max_sequence_length
    plan = planned_step_gib(cfg, student, tokens, B)
    plan_total = sum(plan.values())
    params = sum(p.numel() for p in student.transformer.parameters())
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "mode": "tiny" if args.tiny else "real-width", "dtype": str(dtype).replace("torch.", ""),
        "resolution": cfg.model.latent_size * 8, "latent": list(x.shape[1:]), "tokens_per_sample": tokens,
        "double_blocks": len(student.transformer.transformer_blocks),
        "single_blocks": len(student.transformer.single_transformer_blocks),
        "trunk_params": params, "batch": B, "K": cfg.policy.num_components, "substeps": total,
        "student_fwd_bwd_s": t_step, "student_fwd_s": t_fwd, "student_fwd_bwd_tflop": f_step / 1e12,
        "student_tflops_achieved": f_step / t_step / 1e12,
        "mfu": (f_step / t_step / 1e12) / peak if peak else None, "peak_tflops": peak or None,
        "teacher_batch": B * n_int, "teacher_fwd_s": t_teacher, "teacher_samples_per_s": B * n_int / t_teacher,
        "teacher_tflops_achieved": f_teacher / t_teacher / 1e12,
        "gm_rollout_s": t_rollout, "gm_rollout_over_student_fwd": t_rollout / t_fwd,
        "peak_mem_measured_gib": measured_peak, "peak_mem_planned_gib": plan_total, "plan_parts_gib": plan,
        "peak_mem_measured_over_planned": measured_peak / plan_total if not math.isnan(measured_peak) else None,
    }


def table(r: dict) -> str:
    def f(v, spec):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    rows = [
        ("device", r["device"]),
        ("trunk", f"FLUX {r['double_blocks']}+{r['single_blocks']} blocks, {r['trunk_params'] / 1e9:.2f}B params, "
                  f"{r['dtype']}"),
        ("shape", f"{r['resolution']}^2, latent {r['latent']}, {r['tokens_per_sample']} tokens, batch {r['batch']}"),
        ("student fwd+bwd", f"{r['student_fwd_bwd_s'] * 1e3:.1f} ms, {r['student_fwd_bwd_tflop']:.2f} TFLOP, "
                            f"{r['student_tflops_achieved']:.1f} TFLOP/s"),
        ("student MFU", f(r["mfu"], ".1%") + (f" of {r['peak_tflops']:g} TFLOP/s" if r["peak_tflops"] else "")),
        ("teacher forward", f"{r['teacher_fwd_s'] * 1e3:.1f} ms for {r['teacher_batch']} latents, "
                            f"{r['teacher_samples_per_s']:.1f} samples/s, {r['teacher_tflops_achieved']:.1f} TFLOP/s"),
        ("GM rollout (K=%d, %d substeps)" % (r["K"], r["substeps"]),
         f"{r['gm_rollout_s'] * 1e3:.1f} ms = {r['gm_rollout_over_student_fwd']:.3f} x one student forward"),
        ("peak memory measured / plan", f"{f(r['peak_mem_measured_gib'], '.2f')} / {r['peak_mem_planned_gib']:.2f} GiB"
                                        f" (ratio {f(r['peak_mem_measured_over_planned'], '.2f')})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()) if not args.tiny else 1)
    result = run(args)
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("gpu_step_tiny.json" if args.tiny else "gpu_step.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
