"""The production recipes fit the clusters they state (issue 21, item 5): each names its node shape
(`cluster.nodes`, `gpus_per_node`, `cpus_per_node`, `memory_gb_per_node`, `gpu_memory_gb`); its student and teacher
GPUs, CPUs and batch agree with it; `piflow plan`'s memory plan fits its GPUs; `train.ckpt_every` bounds the work
at risk to about 30 minutes of the step time the recipe states (with its source); and every paper hyper-parameter
(PIFLOW.md §5) is as the paper has it."""
from __future__ import annotations

import re

import pytest

from tests.recipes import RECIPES, recipe_path
from trainer.config import load_config

# PIFLOW.md §5 (the released configs); the global batch in prompts (data-free: 2 per GPU x 32 GPUs)
PAPER = {
    "flux": {"policy.num_components": 8, "distill.nfe": 4, "distill.final_step_scale": 0.5, "distill.shift": 3.2,
             "distill.total_substeps": 128, "distill.num_intermediate": 4, "distill.window_substeps": 3.0,
             "policy.dropout": 0.1, "distill.teacher_ratio_decay_iters": 2000, "teacher.guidance.mode": "embedded",
             "teacher.guidance.scale": 3.5, "distill.loss_scale": 30.0, "optim.lr": 1e-4, "optim.warmup_iters": 100,
             "optim.grad_clip_start": 100, "ema.start": 100, "lora.rank": 256, "lora.alpha": 256.0,
             "lora.dropout": 0.05, "lora.init": "gaussian", "train.iters": 3000, "train.batch_size": 64},
    "qwen_image": {"policy.num_components": 8, "distill.nfe": 4, "distill.final_step_scale": 0.5,
                   "distill.shift": 3.2, "distill.total_substeps": 128, "distill.num_intermediate": 2,
                   "distill.window_substeps": 3.0, "policy.dropout": 0.1, "distill.teacher_ratio_decay_iters": 0,
                   "teacher.guidance.mode": "cfg", "teacher.guidance.scale": 4.0, "distill.loss_scale": 30.0,
                   "optim.lr": 1e-4, "optim.warmup_iters": 100, "optim.grad_clip_start": 100, "ema.start": 100,
                   "lora.rank": 256, "lora.alpha": 256.0, "lora.dropout": 0.05, "train.iters": 9000,
                   "train.batch_size": 64},
    "dit": {"policy.num_components": 32, "distill.nfe": 1, "distill.final_step_scale": 1.0, "distill.shift": 1.0,
            "distill.total_substeps": 128, "distill.num_intermediate": 2, "distill.window_substeps": 0.0,
            "policy.dropout": 0.05, "teacher.guidance.mode": "cfg", "teacher.guidance.scale": 2.7,
            "distill.loss_scale": 3.0, "optim.lr": 5e-5, "optim.warmup_iters": 400, "optim.grad_clip_start": 400,
            "ema.start": 400, "lora.enabled": False, "train.iters": 140000, "train.batch_size": 4096},
}
COMMON = {"optim.betas": (0.9, 0.95), "optim.weight_decay": 0.0, "optim.warmup_start_factor": 0.001,
          "optim.grad_clip": 50.0, "ema.gamma": 7.0, "model.gradient_checkpointing": True,
          "train.precision": "bf16"}


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("family", sorted(RECIPES))
def test_the_recipe_fits_the_node_shape_it_states(family):
    from trainer.planner.memory import make_plan

    cfg = load_config(recipe_path(family))
    c, s, t = cfg.cluster, cfg.cluster.student, cfg.teacher
    assert min(c.nodes, c.gpus_per_node, c.cpus_per_node, c.memory_gb_per_node, c.gpu_memory_gb) > 0
    gpus = c.nodes * c.gpus_per_node
    teacher_gpus = 0 if t.placement == "shared" else t.replicas * t.gpus_per_replica
    assert s.gpus_per_worker == 1.0 and s.workers + teacher_gpus <= gpus  # one rank per GPU, teachers beside
    assert c.gpus_per_node * s.cpus_per_worker <= c.cpus_per_node  # a full node of ranks has its CPUs
    cpus = s.workers * s.cpus_per_worker + cfg.data.workers * c.data_cpus_per_worker
    cpus += 0 if t.placement == "shared" else t.replicas * t.cpus_per_replica
    assert cpus <= c.nodes * c.cpus_per_node
    micro = cfg.train.micro_batch_size or cfg.train.batch_size // s.workers
    assert cfg.train.batch_size % (micro * s.workers) == 0
    plan = make_plan(cfg, gpus, c.gpu_memory_gb)
    assert plan.student_gpus >= s.workers and plan.teacher_gpus == teacher_gpus
    row = next(r for r in plan.student_rows if r.mode == ("lora" if cfg.lora.enabled else "full")
               and r.checkpointing == cfg.model.gradient_checkpointing)
    assert plan.fits(row), (row.total_gib, c.gpu_memory_gb)
    assert not plan.teacher_gpus or plan.teacher_gib <= c.gpu_memory_gb
    # about 30 minutes of work at risk, at the step time the recipe states (and sources) beside the key
    text = recipe_path(family).read_text()
    m = re.search(r"ckpt_every: (\d+) +# ~30 min at ~(\d+) s/step", text)
    assert m and int(m[1]) == cfg.train.ckpt_every, "state the step-time estimate beside train.ckpt_every"
    assert 20 * 60 <= int(m[1]) * int(m[2]) <= 40 * 60
    assert "Step time" in text and "time planner" in text  # the estimate's source, and what replaces it
    for key, want in {**COMMON, **PAPER.get(family, {})}.items():
        got = _get(cfg, key)
        assert (got == pytest.approx(want)) if isinstance(want, float) else got == want, (key, got, want)
