"""Real-width rehearsals (issue 13, tier `slow`): FLUX.1-dev, Qwen-Image and DiT-XL/2 with their released
architecture (width, heads, embedders, text-conditioning widths: models/families/*.py's public configs) at
reduced depth, random bf16 weights saved as a diffusers dir; 2 pi-ID iterations in bf16 through the distributed
path (2 ZeRO-3 ranks, the partitioned loader, the recipe's LoRA and teacher placement; data-free, conditioning
of the released widths), then export and sample. Each rank's parameters, gradients, optimiser states and EMA,
measured on the tensors, are within 10% of `piflow plan` for that config and world size."""
from __future__ import annotations

import math

import pytest
import torch

from tests.trainer.bf16_workers import run_recipe
from tests.trainer.ds_spawn import run_ranks
from trainer.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(1500)]

RECIPES = {"flux": "configs/flux_dev_gm_k8_4nfe.yaml", "qwen_image": "configs/qwen_image_gm_k8_4nfe.yaml",
           "dit": "configs/dit_imagenet_gm_k32_1nfe.yaml"}
DEPTH = {"flux": {"num_layers": 1, "num_single_layers": 1}, "qwen_image": {"num_layers": 1},
         "dit": {"num_layers": 2}}
LATENT = {"flux": 8, "qwen_image": 8, "dit": 8}  # small latents: 16 image tokens (2x2 patches)


def real_width_dir(family: str, root) -> str:
    """The released architecture at reduced depth, random weights in bf16, as `root/transformer`."""
    from models.families import get_family
    from models.families.dit import DIT_XL2_CONFIG
    from models.families.flux import FLUX_DEV_CONFIG
    from models.families.qwen_image import QWEN_IMAGE_CONFIG

    public = {"flux": FLUX_DEV_CONFIG, "qwen_image": QWEN_IMAGE_CONFIG, "dit": DIT_XL2_CONFIG}[family]
    torch.manual_seed(0)
    net = get_family(family).transformer_class(**{**public, **DEPTH[family]}).to(torch.bfloat16)
    net.save_pretrained(str(root / "transformer"))
    del net
    return str(root)


def rehearsal_cfg(family: str, pretrained: str, out: str):
    o = [f"model.pretrained={pretrained}", "model.tiny=false", f"run.output={out}", "run.force=true",
         "train.iters=2", "train.batch_size=2", "train.micro_batch_size=0", "cluster.student.workers=2",
         "train.ckpt_every=2", "eval.every=0", f"model.latent_size={LATENT[family]}", "model.max_sequence_length=8",
         "distill.total_substeps=16", "distill.num_intermediate=2", "distill.teacher_ratio_decay_iters=0",
         "ema.start=0", "optim.warmup_iters=0", "model.gradient_checkpointing=false", "teacher.replicas=1",
         "teacher.gpus_per_replica=0", "teacher.cpus_per_replica=0", "wandb.mode=disabled",
         "distill.data_free=true", "data.shards="]  # data-free: conditioning of the released widths, no data
    if family != "dit":
        o += ["distill.nfe=2"]
    return load_config(RECIPES[family], o)


def planned_bytes_per_rank(cfg, world: int) -> dict[str, float]:
    """`piflow plan`'s per-GPU parameter, gradient, optimiser and EMA bytes for this config (the dir's arch) in
    the layout the ranks take (CPU ranks: `auto` = the replicated base, trainables kept whole)."""
    from trainer.planner.memory import BYTES, frozen_group_size, make_plan, runtime_layout

    plan = make_plan(cfg, gpus=world + (0 if cfg.teacher.placement == "shared" else 1), gpu_mem_gib=80)
    assert plan.student_gpus == world
    layout, _ = runtime_layout(cfg, world, world, None)
    c = plan.counts
    trainable = c.lora + c.head + c.norm_out if cfg.lora.enabled else c.total + c.head
    frozen = c.total if cfg.lora.enabled else 0
    group = frozen_group_size(layout.frozen, world, world)
    whole = trainable * BYTES["weight"] if layout.trainable == "per_step" else 0
    return {"weights_frozen": frozen * BYTES["frozen"] / group, "trainables_whole": whole,
            "weights_trainable": trainable * BYTES["weight"] / world, "grads": trainable * BYTES["grad"] / world,
            "master": trainable * BYTES["master"] / world, "adam": trainable * BYTES["adam"] / world,
            "ema": trainable * BYTES["ema"] / world}


@pytest.mark.parametrize("family", ["dit", "flux", "qwen_image"])
def test_real_width_rehearsal(family, tmp_path):
    from models.pipeline import PiFlowStudent
    from models.sampling import sample
    from trainer.export.pipeline import export_student

    torch.set_num_threads(1)
    pretrained = real_width_dir(family, tmp_path / "base")
    cfg = rehearsal_cfg(family, pretrained, str(tmp_path / "run"))
    summaries = run_ranks(run_recipe, 2, cfg.to_dict(), timeout=1400)
    planned = planned_bytes_per_rank(cfg, 2)
    rows = []
    for s in summaries:
        assert s["steps"] == 2 and s["dtypes"] == {"params": ["bfloat16"], "master": ["float32"], "ema": ["float32"]}
        measured = s["memory_bytes"]
        for key, want in planned.items():
            rows.append((s["rank"], key, measured[key], want))
            if want > 1e6:  # parts that matter (a LoRA run's ~0 frozen-trainable rows are skipped)
                assert measured[key] == pytest.approx(want, rel=0.10), (key, measured[key], want)
        assert sum(measured.values()) == pytest.approx(sum(planned.values()), rel=0.10)
    print("\n".join(f"rank {r} {k:<18} measured {m / 2**20:9.1f} MiB  planned {p / 2**20:9.1f} MiB"
                    for r, k, m, p in rows))
    from trainer.metrics import read_metrics

    losses = [r["loss"] for r in read_metrics(summaries[0]["metrics_path"]) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    export_student(str(tmp_path / "run"), tmp_path / "export")
    student = PiFlowStudent.from_pretrained(str(tmp_path / "export" / "student")).student
    from cluster.student_group import cond_shapes_without_prompts
    from trainer.distributed import RankInfo
    from trainer.rank_program import synthetic_batches

    noise, cond = next(synthetic_batches(cfg, RankInfo(0, 1, 0), cond_shapes_without_prompts(cfg)))
    cond = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in cond.items()}
    with torch.no_grad():
        x0 = sample(lambda x, sigma: student.make_policy(x, sigma, cond), noise, cfg.distill.nfe,
                    cfg.distill.final_step_scale, cfg.distill.shift, 16)
    assert x0.shape == noise.shape and bool(torch.isfinite(x0).all()) and float(x0.std()) > 0.1
