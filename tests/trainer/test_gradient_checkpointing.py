"""Activation checkpointing (issue 21, item 2): turned on in one place, where the family builds the student
(models/student.py), and verified by every engine (trainer/engine.py). The production FLUX recipe (DeepSpeed,
bf16, checkpointing) used to fail on every rank with "the student has no block that supports it": the DeepSpeed
engine counted only the blocks it switched on itself, after the builder had switched them all on already."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.recipes import recipe_config


def _student(cfg):
    from models.families import get_family
    from models.teacher import Teacher

    family = get_family(cfg.model.family)
    teacher = Teacher(family, cfg, None)  # shared placement: the student's own base is the teacher
    return family.build_student(cfg, teacher=teacher, network=family.load_network(cfg))


def _loss_and_grads(student, cfg):
    from cluster.student_group import cond_shapes_without_prompts
    from trainer.distributed import RankInfo
    from trainer.rank_program import synthetic_batches

    noise, cond = next(synthetic_batches(cfg, RankInfo(0, 1, 0), cond_shapes_without_prompts(cfg)))
    torch.manual_seed(0)  # the LoRA dropout masks: the same in both passes (a recomputation replays its own)
    means, logweights, logstd = student(noise, torch.full((noise.shape[0],), 0.7), cond)
    loss = (means ** 2).mean() + logweights.exp().var() + logstd.mean()
    params = [p for p in student.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


def test_checkpointing_is_on_once_and_the_engine_verifies_it(monkeypatch):
    from trainer.engine import build_engine
    from trainer.torch_engine import checkpointed_models

    cfg = recipe_config("flux", "train.engine=torch", "cluster.student.workers=1", "train.precision=fp32",
                        "model.dtype=float32")
    assert cfg.model.gradient_checkpointing  # as the recipe says
    student = _student(cfg)
    assert checkpointed_models(student) == 1  # the trunk, switched on by the builder
    build_engine(cfg, student)  # verified, not switched on a second time

    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss, grads = _loss_and_grads(student, cfg)
    blocks = len(student.transformer.transformer_blocks) + len(student.transformer.single_transformer_blocks)
    assert len(calls) == blocks == 2  # every block of the forward ran under checkpoint
    student.transformer.disable_gradient_checkpointing()
    loss_plain, grads_plain = _loss_and_grads(student, cfg)
    assert len(calls) == blocks and torch.equal(loss, loss_plain)  # recomputation changes no number
    for g, h in zip(grads, grads_plain):
        assert torch.allclose(g, h, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="model.gradient_checkpointing: true, but no block"):
        build_engine(cfg, student)  # the config asks for checkpointing, the student does not run it


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(1500)
def test_the_flux_recipe_trains_under_deepspeed_with_checkpointing(tmp_path):
    """The issue's command: the FLUX recipe (deepspeed, bf16, gradient checkpointing) on 2 ZeRO-3 ranks."""
    from tests.trainer.bf16_workers import run_recipe
    from tests.trainer.ds_spawn import run_ranks

    cfg = recipe_config("flux", "train.iters=2", "eval.every=0", output=str(tmp_path / "run"))
    assert (cfg.train.engine, cfg.train.precision, cfg.model.gradient_checkpointing) == ("deepspeed", "bf16", True)
    summaries = run_ranks(run_recipe, 2, cfg.to_dict(), timeout=1400)
    assert [s["steps"] for s in summaries] == [2, 2]
    losses = [json.loads(line)["loss"] for line in open(summaries[0]["metrics_path"])]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
