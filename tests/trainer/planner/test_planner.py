"""`piflow plan`: parameter counts of the real FLUX.1-dev / Qwen-Image transformers built on the meta device, and
the memory arithmetic. Also pins the paper hyper-parameters of the shipped configs (PIFLOW.md §5)."""
from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main
from trainer.config import ConfigError, load_config
from trainer.planner.memory import BYTES, GiB, OVERHEAD_GIB, count_model, make_plan

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
FLUX = CONFIGS / "flux_dev_gm_k8_4nfe.yaml"
QWEN = CONFIGS / "qwen_image_gm_k8_4nfe.yaml"
DIT = CONFIGS / "dit_imagenet_gm_k32_1nfe.yaml"
D, r = 3072, 256


def test_flux_dev_counts():
    c = count_model(load_config(FLUX))
    assert round(c.total / 1e9, 2) == 11.90
    assert c.num_blocks == 19 + 38 and c.hidden == D
    # LoRA by hand: double blocks ff/ff_context (D->4D, 4D->D), single blocks proj_mlp (D->4D) and proj_out
    # (5D->D), timestep_embedder linear_1 (256->D) and linear_2 (D->D); the root proj_out is the head's, not LoRA's.
    lora = 19 * 4 * r * 5 * D + 38 * (r * 5 * D + r * 6 * D) + r * (256 + D) + r * 2 * D
    assert c.lora == lora
    # GM head K=8 on 64 features/token, 4 pixels per token; logstd MLP D -> 1024 -> 1
    assert c.head == (D * 8 * 64 + 8 * 64) + (D * 8 * 4 + 8 * 4) + (D * 1024 + 1024 + 1024 + 1)
    assert c.norm_out == D * 2 * D + 2 * D  # AdaLayerNormContinuous: Linear(D, 2D)


def test_qwen_image_counts():
    c = count_model(load_config(QWEN))
    assert round(c.total / 1e9, 2) == 20.43
    assert c.num_blocks == 60
    # img_mlp in 60 blocks, txt_mlp in 59 (not the last block), timestep embedder
    assert c.lora == 60 * 2 * r * 5 * D + 59 * 2 * r * 5 * D + r * (256 + D) + r * 2 * D


def test_memory_arithmetic_flux_lora_shared():
    cfg = load_config(FLUX, ["train.frozen_weights=shard", "train.trainable_comm=per_pass"])
    plan = make_plan(cfg, gpus=32, gpu_mem_gib=80)
    c = plan.counts
    assert plan.student_gpus == 32 and plan.teacher_gpus == 0 and plan.micro_batch == 2
    assert plan.tokens == 64 * 64 + 512
    lora_ckpt = next(row for row in plan.student_rows if row.mode == "lora" and row.checkpointing)
    parts = lora_ckpt.parts_gib
    trainable = c.lora + c.head + c.norm_out
    assert parts["frozen base (bf16)"] == pytest.approx(2 * c.total / 32 / GiB)
    assert parts["trainables kept whole (per_step)"] == 0
    assert parts["trainable states (ZeRO-3 shard)"] == pytest.approx(20 * trainable / 32 / GiB)  # 2+2+4+8+4 bytes
    assert parts["ZeRO-3 gathered blocks (2 in flight)"] == pytest.approx(2 * 2 * c.largest_block / GiB)
    act = (2 * 57 + 34) * plan.tokens * D * 2  # saved block inputs + one block recomputed, micro-batch 2
    assert parts["activations"] == pytest.approx(act / GiB)
    teacher = 20 * plan.tokens * D * (2 * 4)  # micro-batch x n_int queries, no CFG
    assert parts["teacher forward (shared, no_grad)"] == pytest.approx(teacher / GiB)
    assert lora_ckpt.total_gib == pytest.approx(sum(parts.values()))
    assert parts["overhead"] == OVERHEAD_GIB
    full_no_ckpt = next(row for row in plan.student_rows if row.mode == "full" and not row.checkpointing)
    assert full_no_ckpt.parts_gib["trainable states (ZeRO-3 shard)"] == pytest.approx(
        sum(BYTES[k] for k in ("weight", "grad", "master", "adam", "ema")) * (c.total + c.head) / 32 / GiB)
    assert full_no_ckpt.parts_gib["activations"] == pytest.approx(34 * 57 * plan.tokens * D * 2 / GiB)


def test_separate_teacher_group_and_verdicts():
    cfg = load_config(DIT)  # 4 teacher replicas on 1 GPU each, the paper's 512 per forward
    plan = make_plan(cfg, gpus=8, gpu_mem_gib=80)
    assert (plan.student_gpus, plan.teacher_gpus, plan.micro_batch) == (4, 4, 512)
    request = 512 * 2 * 2  # n_int queries, CFG doubles
    expected = (2 * plan.counts.total + 20 * plan.tokens * plan.counts.hidden * request) / GiB + OVERHEAD_GIB
    assert plan.teacher_gib == pytest.approx(expected)
    assert plan.fits(plan.student_rows[0]) and not make_plan(cfg, 8, 4).fits(plan.student_rows[0])
    with pytest.raises(ConfigError, match="leave none for the student"):
        make_plan(cfg, gpus=2, gpu_mem_gib=80)


def test_plan_command_prints_counts_and_says_when_it_does_not_fit(capsys):
    assert main(["plan", str(FLUX), "--gpus", "32", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "11.90B parameters" in out and "this config (lora+ckpt): FITS" in out
    assert main(["plan", str(QWEN), "train.micro_batch_size=0", "--gpus", "8", "--gpu-mem", "24"]) == 0  # 8 a GPU
    out = capsys.readouterr().out
    assert "20.43B parameters" in out and "this config (lora+ckpt): DOES NOT FIT" in out


def test_paper_hyper_parameters_in_configs():
    flux, qwen, dit = load_config(FLUX), load_config(QWEN), load_config(DIT)
    assert (flux.policy.num_components, flux.distill.nfe, flux.distill.num_intermediate) == (8, 4, 4)
    assert (flux.distill.teacher_ratio_decay_iters, flux.distill.loss_scale, flux.train.iters) == (2000, 30.0, 3000)
    assert (flux.teacher.guidance.mode, flux.teacher.guidance.scale) == ("embedded", 3.5)
    assert (flux.lora.rank, flux.lora.alpha, flux.lora.dropout) == (256, 256.0, 0.05)
    assert (qwen.distill.num_intermediate, qwen.distill.teacher_ratio_decay_iters, qwen.train.iters) == (2, 0, 9000)
    assert (qwen.teacher.guidance.mode, qwen.teacher.guidance.scale, qwen.teacher.guidance.interval) == (
        "cfg", 4.0, (0.0, 1.0))
    assert (dit.policy.num_components, dit.distill.nfe, dit.distill.shift, dit.distill.loss_scale) == (32, 1, 1.0, 3.0)
    assert (dit.teacher.guidance.scale, dit.teacher.guidance.interval, dit.model.num_timesteps) == (
        2.7, (0.0, 0.6), 1000.0)
    assert not dit.lora.enabled and dit.optim.lr == 5e-5 and dit.ema.start == 400
    for cfg in (flux, qwen):
        assert (cfg.distill.shift, cfg.distill.final_step_scale, cfg.distill.window_substeps) == (3.2, 0.5, 3.0)
        assert cfg.policy.dropout == 0.1 and cfg.teacher.placement == "shared"


def _lora_row(plan):
    return next(row for row in plan.student_rows if row.mode == "lora" and row.checkpointing)


def test_frozen_base_placement_memory():
    """replicate keeps the whole bf16 base on every GPU and gathers no block of it; shard_in_node divides it by
    the GPUs of a node, shard by all; per_step adds whole bf16 trainable weights and gradients."""
    rows = {}
    for frozen in ("replicate", "shard_in_node", "shard"):
        cfg = load_config(FLUX, [f"train.frozen_weights={frozen}", "train.trainable_comm=per_step"])
        plan = make_plan(cfg, gpus=16, gpu_mem_gib=80, gpus_per_node=8)
        assert (plan.layout.frozen, plan.layout.trainable) == (frozen, "per_step")
        rows[frozen] = _lora_row(plan).parts_gib
    c = count_model(load_config(FLUX))
    trainable = c.lora + c.head + c.norm_out
    for frozen, group in (("replicate", 1), ("shard_in_node", 8), ("shard", 16)):
        assert rows[frozen]["frozen base (bf16)"] == pytest.approx(2 * c.total / group / GiB)
        assert rows[frozen]["trainables kept whole (per_step)"] == pytest.approx(4 * trainable / GiB)
    assert rows["replicate"]["ZeRO-3 gathered blocks (2 in flight)"] == 0
    assert rows["shard"]["ZeRO-3 gathered blocks (2 in flight)"] == pytest.approx(4 * c.largest_block / GiB)


@pytest.mark.parametrize("mem,want", [(80, ("replicate", "per_step")), (24, ("shard_in_node", "per_step")),
                                      (14, ("shard_in_node", "per_pass")), (12, ("shard", "per_pass")),
                                      (8, ("shard", "per_pass"))])
def test_auto_layout_takes_the_first_that_fits(mem, want):
    """FLUX on 2 nodes x 8 GPUs: the replicated base (about 40 GiB with everything else) fits 80 GiB, not 24;
    a node-sharded base fits 24, and 14 once the trainables are gathered per pass; below that only the all-rank
    shard is left (12 GiB: the recipe's 2-prompt micro-batches keep activations small), and when nothing fits
    (8 GiB) the most sharded layout is kept and the plan says so."""
    plan = make_plan(load_config(FLUX), gpus=16, gpu_mem_gib=mem, gpus_per_node=8)
    assert (plan.layout.frozen, plan.layout.trainable) == want
    assert plan.fits(plan.layout) == (mem >= 12)
    explicit = make_plan(load_config(FLUX, ["train.frozen_weights=replicate"]), gpus=16, gpu_mem_gib=mem,
                         gpus_per_node=8)
    assert explicit.layout.frozen == "replicate"  # an explicit choice is kept, fitting or not


def test_full_fine_tune_has_no_frozen_placement():
    plan = make_plan(load_config(DIT), gpus=10, gpu_mem_gib=80)
    assert plan.layout.frozen == "shard" and plan.layout.parts_gib["frozen base (bf16)"] == 0
