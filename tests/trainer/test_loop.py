"""The training loop on the tiny toy: loss goes down, metrics.jsonl has the promised records, hooks fire."""
from __future__ import annotations

import statistics

import pytest
import torch

from tests.trainer.toy_helpers import one_thread, tiny_toy_config, toy_teacher_cache  # noqa: F401 (fixtures)
from trainer.ema import PowerEMA
from trainer.engine import build_engine
from trainer.local_run import build_family, noise_batches, run_local
from trainer.teachers.build import build_teacher
from trainer.loop import piid_params, train_loop
from trainer.metrics import read_metrics


def test_local_run_writes_metrics_with_decreasing_loss(tmp_path, toy_teacher_cache, one_thread):
    # A large symmetry-breaking noise puts the student far from the teacher at init, so the loss has room to fall.
    cfg = tiny_toy_config(tmp_path, "policy.init_bias_noise=1.0", "train.iters=40", teacher_cache=toy_teacher_cache)
    run = run_local(cfg, progress=False, checkpoints=False)
    records = read_metrics(run.metrics_path)
    assert [r["step"] for r in records] == list(range(1, 41))
    first = statistics.fmean(r["loss"] for r in records[:3])
    last = statistics.fmean(r["loss"] for r in records[-5:])
    assert last < 0.3 * first, (first, last)
    r = records[-1]
    # per-segment losses add up to the total with segment-length weights (§3.5): S = 1/2 for both at 2 NFE, f = 1
    assert r["loss"] == pytest.approx(0.5 * r["loss/seg0"] + 0.5 * r["loss/seg1"], rel=1e-5)
    for key in ("grad_norm", "lr", "logstd_mean", "time/data_wait", "time/student_fwd", "time/backward",
                "time/teacher_wait", "time/optimizer", "time/step"):
        assert key in r
    assert r["lr"] == pytest.approx(cfg.optim.lr)
    assert r["time/step"] >= r["time/teacher_wait"] + r["time/backward"]


def test_a_fresh_run_into_a_used_output_logs_each_step_once(tmp_path, toy_teacher_cache, one_thread):
    # A benchmark reran a setting into the same run.output and averaged the old run's losses with the new ones.
    cfg = tiny_toy_config(tmp_path, "train.iters=5", teacher_cache=toy_teacher_cache)
    first = read_metrics(run_local(cfg, progress=False, checkpoints=False).metrics_path)
    again = run_local(cfg, progress=False, checkpoints=False)
    records = read_metrics(again.metrics_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in records] == [r["loss"] for r in first]  # same seed, same run


def test_loop_hooks_and_ema(tmp_path, toy_teacher_cache, one_thread):
    cfg = tiny_toy_config(tmp_path, "train.iters=6", "train.ckpt_every=4", "eval.every=3",
                          teacher_cache=toy_teacher_cache)
    family = build_family(cfg)
    teacher = build_teacher(cfg, family, progress=False)
    student = family.build_student(cfg, teacher)
    engine = build_engine(cfg, student)
    ema = PowerEMA(student.parameters(), gamma=cfg.ema.gamma, start=cfg.ema.start)
    saved, evaluated = [], []

    def eval_hook(step):
        # runs with the EMA weights applied
        live = [p for p in student.parameters()][0].detach().clone()
        evaluated.append((step, torch.equal(live, ema.shadow[0])))
        return {"score": float(step)}

    steps = train_loop(cfg, engine, student.make_policy, teacher,
                       noise_batches(cfg, family, torch.Generator().manual_seed(0)), ema=ema,
                       eval_hook=eval_hook, checkpoint_hook=lambda step, loss=None: saved.append(step) or 0.0,
                       generator=torch.Generator().manual_seed(1), progress=False)
    assert steps == 6
    assert saved == [4, 6]  # every ckpt_every steps and at the end
    assert [s for s, _ in evaluated] == [3, 6] and all(ok for _, ok in evaluated)
    assert engine.global_step == 6


def test_piid_params_follow_the_config(tmp_path):
    p = piid_params(tiny_toy_config(tmp_path, "policy.type=dx", "policy.dropout=0.1"))
    assert (p.nfe, p.shift, p.total_substeps, p.num_intermediate, p.loss_scale) == (2, 1.0, 16, 2, 3.0)
    assert p.dropout == 0.0  # component dropout is GM only (PIFLOW.md §2.6)
