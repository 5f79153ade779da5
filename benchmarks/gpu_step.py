"""One pi-Flow training step of FLUX.1-dev width on a GPU, measured (issue 13).

A real-width, reduced-depth FLUX.1-dev transformer (the released config: hidden 3072 = 24 heads x 128, T5 width
4096, CLIP pooled 768, RoPE axes (16, 56, 56); `--double` double-stream and `--single` single-stream blocks
instead of 19 + 38), random bf16 weights, built the way a student rank builds it (`family.build_student`: the
recipe's LoRA rank 256 on the recipe's targets, the GM head K = 8, the trainable output norm; the teacher is the
LoRA base with the adapters off, `teacher.placement: shared`) through the trainer's own code: the trunk built
partitioned (`build_partitioned_student`) and the DeepSpeed ZeRO-3 engine of `train.engine: deepspeed` on one
rank (`build_engine`), whose bf16 policy makes every trainable a bf16 model weight with an fp32 master (issue 23:
the first version built the student beside the engine and ran LoRA and the head in float32). At `--resolution`
1024 (a 128 x 128 x 16 latent, 4096 image tokens + `--text-tokens` T5 tokens) it measures:

- student forward + backward: time, FLOPs (counted by torch's FlopCounterMode on the same call, without
  activation checkpointing, so they are model FLOPs) and MFU against the bf16 matmul rate this script measures
  on the same GPU (8192^3, median of 20), and against the datasheet's dense bf16 peak (989 TFLOP/s for H100/H200);
- teacher forward throughput: latents per second for one rank's request (micro-batch x n_int queries);
- the 128-substep GM rollout (network-free, K = 8) as a fraction of one student forward;
- peak memory of one optimizer step against `piflow plan` for the same reduced-depth model on 1 GPU.

    python benchmarks/gpu_step.py                 # CUDA: real width, 1 double + 2 single blocks, 1024^2
    python benchmarks/gpu_step.py --tiny          # CPU: the tiny FLUX config at a small latent (the test suite)

Prints one table and writes JSON: on a GPU to benchmarks/results/gpu_step.json; `--tiny` or a CPU run to a
temporary file (never over the committed GPU figures); `--out` anywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def frozen_buffers(student, engine) -> list:
    """The frozen weights the engine keeps as plain buffers (`train.frozen_weights: replicate`): parameters of
    the model, not of the optimizer."""
    return [student.get_buffer(n) for n in getattr(engine, "frozen_buffers", None) or ()]


def default_out(name: str, on_gpu: bool) -> str:
    """Where a benchmark writes by default: benchmarks/results/NAME (GPU figures, committed) on a GPU, a temporary
    file otherwise (a `--tiny` or CPU check must never overwrite the GPU results)."""
    if on_gpu:
        return str(ROOT / "benchmarks" / "results" / name)
    return os.path.join(tempfile.gettempdir(), "piflow-benchmarks", name)


def single_process_group() -> None:
    """This process as rank 0 of 1 (what Ray Train or torchrun set for a rank), so the ZeRO-3 engine can start."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)


def recipe_config(overrides: list[str]):
    """The FLUX recipe with this benchmark's overrides: one rank of `train.engine: deepspeed`, shared teacher."""
    from trainer.config import load_config

    return load_config(str(ROOT / "configs" / "flux_dev_gm_k8_4nfe.yaml"), [
        "model.pretrained=", "run.output=/tmp/piflow-gpu-bench", "train.engine=deepspeed", "cluster.student.workers=1",
        "teacher.placement=shared", "train.micro_batch_size=0", "wandb.mode=disabled", "eval.every=0",
        *overrides])


def build_rank_student(cfg, conf: dict):
    """(student, teacher, engine) as `trainer.rank_program.build_rank` builds them for a shared-placement LoRA
    rank, with random weights of the transformer config `conf` (no weights file): the trunk is constructed under
    `deepspeed.zero.Init` (so directly in the run's dtype on the accelerator), the student (LoRA, GM head, norm_out)
    and the shared teacher are the family's, and the engine is the trainer's (bf16 policy, fp32 masters)."""
    from models.families import get_family
    from models.teacher import Teacher
    from trainer.engine import build_engine, build_partitioned_student

    single_process_group()
    family = get_family(cfg.model.family)
    teacher = Teacher(family, cfg, None)

    def trunk():
        torch.manual_seed(0)
        return family.transformer_class(**conf)

    def finish(network):
        return family.build_student(cfg, teacher=teacher, network=network)

    student = build_partitioned_student(cfg, trunk, None, family.output_modules, finish)
    engine = build_engine(cfg, student)  # the family's build_student turned checkpointing on when asked
    return student, teacher, engine


def build(args, device: torch.device):
    """(cfg, family, conf, student, teacher, engine) of this benchmark's FLUX student."""
    from models.families import get_family
    from models.families.flux import FLUX_DEV_CONFIG

    latent = args.resolution // 8
    overrides = [f"model.latent_size={latent}", f"model.max_sequence_length={args.text_tokens}",
                 f"model.gradient_checkpointing={str(args.checkpointing).lower()}", f"train.batch_size={args.batch}",
                 f"train.precision={args.precision}", f"model.attention_backend={args.attention}",
                 f"train.compile={args.compile}"]
    if args.tiny:
        overrides += ["lora.rank=4", "lora.alpha=4.0", "policy.logstd_inner_dim=16", "model.latent_channels=4"]
    cfg = recipe_config(overrides)
    family = get_family("flux")
    conf = family.tiny_config(cfg) if args.tiny else dict(FLUX_DEV_CONFIG, num_layers=args.double,
                                                             num_single_layers=args.single)
    student, teacher, engine = build_rank_student(cfg, conf)
    return cfg, family, conf, student, teacher, engine


def conditioning(cfg, conf, batch: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(1)
    return {"prompt_embeds": torch.randn(batch, cfg.model.max_sequence_length, conf["joint_attention_dim"],
                                         generator=g).to(device, dtype),
            "pooled_prompt_embeds": torch.randn(batch, conf["pooled_projection_dim"], generator=g).to(device, dtype)}


def timed(fn, device, warmup: int, repeat: int) -> list[float]:
    """Seconds per call (device-synchronised wall clock), after `warmup` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def matmul_tflops(device, n: int, repeat: int) -> float:
    """The bf16 matmul rate of this device (random data, median): the ceiling MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    secs = timed(lambda: a @ b, device, warmup=3, repeat=repeat)
    return 2 * n ** 3 / statistics.median(secs) / 1e12


def policy_loss(policy) -> torch.Tensor:
    """A scalar touching every policy output (the step's cost is the network's, not this sum's)."""
    return policy.means.float().square().mean() + policy.logweights.float().exp().mean() + policy.logstd.float().mean()


def planned_gib(cfg, conf, family) -> dict:
    """`piflow plan` for this reduced-depth model on one GPU (the LoRA row the config uses)."""
    from trainer.planner.memory import make_plan

    cls = type(family)  # get_family may hand out new instances: swap the class attribute the planner reads
    saved = cls.public_config
    cls.public_config = conf  # the planner builds the family's public config on meta
    try:
        plan = make_plan(cfg, gpus=1, gpu_mem_gib=141.0)
    finally:
        cls.public_config = saved
    row = next(r for r in plan.student_rows if r.mode == "lora" and r.checkpointing == cfg.model.gradient_checkpointing)
    return {"total": row.total_gib, **row.parts_gib}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny FLUX on the CPU (or GPU if present): checks the script")
    ap.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1-dev: 19)")
    ap.add_argument("--single", type=int, default=2, help="single-stream blocks (FLUX.1-dev: 38)")
    ap.add_argument("--resolution", type=int, default=0, help="image side in pixels (default 1024; tiny 64)")
    ap.add_argument("--text-tokens", type=int, default=0, help="T5 tokens (default 512; tiny 8)")
    ap.add_argument("--batch", type=int, default=2, help="student micro-batch (the recipe: 2 prompts per GPU)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing (the recipe's setting)")
    ap.add_argument("--repeat", type=int, default=0, help="timed repetitions (default 10 on GPU, 2 on CPU)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="",
                    help="train.precision (default bf16 on a GPU, fp32 for --tiny on the CPU)")
    ap.add_argument("--attention", default="auto", help="model.attention_backend (auto, native, _native_cudnn, "
                    "_native_flash, _native_efficient, flash, _flash_3, ...)")
    ap.add_argument("--compile", choices=["none", "inductor", "aot_eager"], default="none", help="train.compile")
    ap.add_argument("--out", default="", help="JSON path (default: results/gpu_step.json on a GPU, else a temp file)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("gpu_step: no CUDA device: run with --tiny (the CPU check), or on a GPU machine")
    args.resolution = args.resolution or (64 if args.tiny else 1024)
    args.text_tokens = args.text_tokens or (8 if args.tiny else 512)
    args.precision = args.precision or ("fp32" if args.tiny and device.type != "cuda" else "bf16")
    args.out = args.out or default_out("gpu_step.json", device.type == "cuda" and not args.tiny)
    repeat = args.repeat or (10 if device.type == "cuda" else 2)
    warmup = 3 if device.type == "cuda" else 1

    from models.rollout import rollout

    cfg, family, conf, student, teacher, engine = build(args, device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    C, H, W = family.latent_shape(cfg)
    B, n_int = args.batch, cfg.distill.num_intermediate
    g = torch.Generator(device="cpu").manual_seed(2)
    x_src = torch.randn(B, C, H, W, generator=g).to(device)
    sigma_src = torch.ones(B, device=device)
    cond = conditioning(cfg, conf, B, device, dtype)
    trainable = engine.params
    numel = lambda ps: sum(getattr(p, "ds_numel", p.numel()) for p in ps)  # noqa: E731 (ZeRO-3: the full size)

    # ---- student forward + backward (time, model FLOPs, MFU)
    def fwd_bwd():
        engine.backward(policy_loss(student.make_policy(x_src, sigma_src, cond)))

    t_fwd_bwd = statistics.median(timed(fwd_bwd, device, warmup, repeat))
    engine.step()  # drops the accumulated gradients (an update of a benchmark's random weights)

    def fwd():
        with torch.no_grad():
            return student.make_policy(x_src, sigma_src, cond)

    t_fwd = statistics.median(timed(fwd, device, warmup, repeat))

    # ---- teacher forward throughput: one rank's request (B x n_int latents, r = 0)
    x_q = torch.randn(B * n_int, C, H, W, generator=g).to(device)
    sigma_q = torch.rand(B * n_int, generator=g).to(device)
    cond_q = {k: v.repeat_interleave(n_int, dim=0) for k, v in cond.items()}
    t_teacher = statistics.median(timed(lambda: teacher(x_q, sigma_q, cond_q), device, warmup, repeat))

    # ---- the network-free 128-substep GM rollout vs one student forward
    policy = fwd().detach()
    t_rollout = statistics.median(timed(lambda: rollout(policy, x_src, 1.0, 0.0, cfg.distill.shift,
                                                        cfg.distill.total_substeps), device, warmup, repeat))

    # ---- FLOPs (after the timings: a counting mode must not disturb them), without activation checkpointing
    from torch.utils.flop_counter import FlopCounterMode

    ckpt = cfg.model.gradient_checkpointing
    if ckpt:
        student.transformer.disable_gradient_checkpointing()
    with FlopCounterMode(display=False) as counter:
        fwd_bwd()
    fwd_bwd_flops = counter.get_total_flops()
    engine.step()
    with FlopCounterMode(display=False) as fwd_counter, torch.no_grad():
        student.make_policy(x_src, sigma_src, cond)
    fwd_flops = fwd_counter.get_total_flops()
    if ckpt:
        student.transformer.enable_gradient_checkpointing()

    # ---- peak memory of one optimizer step vs the plan
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "tiny": args.tiny,
              "torch": torch.__version__, "blocks": {"double": conf["num_layers"], "single": conf["num_single_layers"]},
              "hidden": conf["num_attention_heads"] * conf["attention_head_dim"], "resolution": args.resolution,
              "latent": [C, H, W], "image_tokens": (H // 2) * (W // 2), "text_tokens": args.text_tokens,
              "micro_batch": B, "checkpointing": ckpt, "precision": args.precision, "attention": args.attention,
              "compile": args.compile, "engine": "deepspeed ZeRO-3, 1 rank", "K": cfg.policy.num_components,
              "parameters": numel(student.parameters()) + numel(frozen_buffers(student, engine)),
              "trainable_parameters": numel(trainable),
              "student_fwd_bwd_s": t_fwd_bwd, "student_fwd_s": t_fwd, "fwd_bwd_flops": fwd_bwd_flops,
              "fwd_flops": fwd_flops, "teacher_request_latents": B * n_int, "teacher_fwd_s": t_teacher,
              "teacher_latents_per_s": B * n_int / t_teacher, "rollout_128_s": t_rollout,
              "rollout_over_student_fwd": t_rollout / t_fwd}
    if device.type == "cuda":
        torch.cuda.synchronize()
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        engine.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        measured_tflops = matmul_tflops(device, 8192, 20)
        name = torch.cuda.get_device_name()
        sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
        plan = planned_gib(cfg, conf, family)
        result.update({
            "matmul_bf16_tflops": measured_tflops, "datasheet_bf16_tflops": sheet,
            "achieved_tflops": fwd_bwd_flops / t_fwd_bwd / 1e12,
            "mfu_vs_measured_matmul": fwd_bwd_flops / t_fwd_bwd / 1e12 / measured_tflops,
            "mfu_vs_datasheet": (fwd_bwd_flops / t_fwd_bwd / 1e12 / sheet) if sheet else None,
            "memory_static_gib": static / 2 ** 30, "memory_peak_gib": peak / 2 ** 30,
            "memory_step_gib": (peak - static) / 2 ** 30, "plan_gib": plan,
            "plan_activations_gib": plan.get("activations"),
        })

    rows = [("student fwd+bwd (s)", f"{t_fwd_bwd:.4f}"), ("student fwd (s)", f"{t_fwd:.4f}"),
            ("fwd+bwd model TFLOP", f"{fwd_bwd_flops / 1e12:.2f}"),
            (f"teacher fwd, {B * n_int} latents (s)", f"{t_teacher:.4f}"),
            ("teacher latents / s", f"{B * n_int / t_teacher:.2f}"),
            ("GM rollout 128 substeps (s)", f"{t_rollout:.4f}"),
            ("rollout / student fwd", f"{t_rollout / t_fwd:.3f}")]
    if device.type == "cuda":
        rows += [("bf16 matmul 8192^3 (TFLOP/s)", f"{result['matmul_bf16_tflops']:.0f}"),
                 ("achieved (TFLOP/s)", f"{result['achieved_tflops']:.0f}"),
                 ("MFU vs measured matmul", f"{result['mfu_vs_measured_matmul']:.3f}"),
                 ("MFU vs datasheet", f"{result['mfu_vs_datasheet']:.3f}" if result["mfu_vs_datasheet"] else "n/a"),
                 ("peak memory, one step (GiB)", f"{result['memory_peak_gib']:.2f}"),
                 ("  of which the step's own (GiB)", f"{result['memory_step_gib']:.2f}"),
                 ("plan total, 1 GPU (GiB)", f"{result['plan_gib']['total']:.2f}"),
                 ("plan activations (GiB)", f"{result['plan_activations_gib']:.2f}")]
    title = (f"{result['device']}: FLUX width {result['hidden']}, {conf['num_layers']}+{conf['num_single_layers']} "
             f"blocks, {args.resolution}^2, batch {B}, K={cfg.policy.num_components}, ckpt={ckpt}, {args.precision}")
    print(title)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v:>10}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
