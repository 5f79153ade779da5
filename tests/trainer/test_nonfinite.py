"""The non-finite guard (issue 12): an injected NaN teacher batch (or a non-finite gradient) skips the
optimizer step and the EMA update, is counted and warned about, never reaches a checkpoint, and too many in a
row stop the run with the newest finite checkpoint intact. The ZeRO-3 test poisons ONE rank's teacher only:
every rank must agree to skip. The NaN comes from trainer/fault_injection.py (keyed by the step)."""
from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from tests.trainer.toy_helpers import one_thread, tiny_toy_config, toy_teacher_cache  # noqa: F401 (fixtures)
from trainer.checkpoint import store as ckpt
from trainer.checkpoint.store import CheckpointManager, latest_valid, read_manifest, step_dirname
from trainer.ema import PowerEMA
from trainer.engine import build_engine
from trainer.fault_injection import NaNTeacher
from trainer.local_run import build_family, noise_batches
from trainer.loop import NonFiniteError, train_loop
from trainer.metrics import MetricsLogger, read_metrics
from trainer.checkpoint.resume import save_state
from trainer.teachers.build import build_teacher


def toy_run(tmp_path, cache, bad: set[int], *overrides: str, keep_last: int = 10):
    """A toy run whose teacher answers NaN for the first sample during the (1-based) steps in `bad`
    (trainer/fault_injection.py, the soak's injector)."""
    cfg = tiny_toy_config(tmp_path, "train.iters=6", "train.ckpt_every=1", "ema.start=0", *overrides,
                          teacher_cache=cache)
    family = build_family(cfg)
    teacher = build_teacher(cfg, family, progress=False)
    torch.manual_seed(0)
    student = family.build_student(cfg, teacher)
    engine = build_engine(cfg, student)
    ema = PowerEMA(student.parameters(), gamma=cfg.ema.gamma, start=cfg.ema.start)
    manager = CheckpointManager(cfg.run.output, keep_last=keep_last)
    console = io.StringIO()
    logger = MetricsLogger(cfg, cfg.run.output, console_every=1, stream=console)
    snaps = {}

    def checkpoint_hook(step, loss=None):
        snaps[step] = {**engine.local_state(), **{f"ema/{i}": s.clone() for i, s in enumerate(ema.shadow)}}
        return save_state(cfg, manager, step, engine, ema, student, loss=loss)

    def run():
        try:
            return train_loop(cfg, engine, student.make_policy, NaNTeacher(teacher, bad),
                              noise_batches(cfg, family, torch.Generator().manual_seed(0)), ema=ema, logger=logger,
                              checkpoint_hook=checkpoint_hook, generator=torch.Generator().manual_seed(1),
                              progress=False)
        finally:
            logger.close()
            manager.close()

    return cfg, engine, run, snaps, console


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_teacher_batch_skips_the_step_and_the_ema(tmp_path, toy_teacher_cache, one_thread, caplog):
    cfg, engine, run, snaps, console = toy_run(tmp_path, toy_teacher_cache, bad={3})
    with caplog.at_level(logging.WARNING, logger="trainer.loop"):
        assert run() == 6
    records = {r["step"]: r for r in read_metrics(Path(cfg.run.output) / "metrics.jsonl")}
    assert math.isnan(records[3]["loss"])  # logged as a number NaN, not hidden as a string
    assert all(math.isfinite(records[s]["loss"]) for s in (1, 2, 4, 5, 6))
    assert [records[s]["nonfinite_skipped"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert same(snaps[3], snaps[2])  # weights, Adam moments and EMA untouched by the skipped step
    assert not same(snaps[4], snaps[3])  # training goes on
    assert engine.global_step == 6 and engine.adam_step() == 5 and engine.skipped_steps == 1
    assert "step 3: non-finite loss and teacher" in caplog.text
    assert "step 3 | loss nan" in console.getvalue() and "nonfinite_skipped 1" in console.getvalue()
    meta = read_manifest(f"{cfg.run.output}/checkpoints/{step_dirname(3)}")["meta"]
    assert meta["loss_finite"] is False and meta["loss"] is None
    assert read_manifest(f"{cfg.run.output}/checkpoints/{step_dirname(4)}")["meta"]["loss_finite"] is True


def test_non_finite_gradient_with_finite_loss_is_skipped(tmp_path, toy_teacher_cache, one_thread):
    cfg, engine, run, snaps, _ = toy_run(tmp_path, toy_teacher_cache, bad=set())
    first = engine.params[0]
    calls = {"n": 0}

    def poison(grad):  # an overflowing gradient on one backward of iteration 1 (two backwards per iteration)
        calls["n"] += 1
        return grad * math.inf if calls["n"] == 3 else grad

    first.register_hook(poison)
    run()
    records = {r["step"]: r for r in read_metrics(Path(cfg.run.output) / "metrics.jsonl")}
    assert math.isfinite(records[2]["loss"]) and not math.isfinite(records[2]["grad_norm"])
    assert records[2]["nonfinite_skipped"] == 1 and same(snaps[2], snaps[1])


def test_consecutive_nan_steps_stop_the_run_and_keep_the_last_finite_checkpoint(tmp_path, toy_teacher_cache,
                                                                                 one_thread):
    cfg, engine, run, snaps, _ = toy_run(tmp_path, toy_teacher_cache, {3, 4, 5, 6}, "train.max_nonfinite_steps=3",
                                         keep_last=2)
    with pytest.raises(NonFiniteError, match=r"step 5: 3 consecutive steps with non-finite loss and teacher"):
        run()
    # keep_last=2 keeps steps 3 and 4 (skipped steps: same weights, loss not finite); the newest checkpoint
    # with a finite loss (2) is retained as well
    assert ckpt.list_steps(cfg.run.output) == [2, 3, 4]
    info = latest_valid(cfg.run.output, "sha256")
    assert info.step == 4 and info.manifest["meta"]["loss_finite"] is False
    assert read_manifest(f"{cfg.run.output}/checkpoints/{step_dirname(2)}")["meta"]["loss_finite"] is True
    assert same(snaps[4], snaps[2])
    assert all(torch.isfinite(v).all() for v in snaps[4].values())


def test_checkpoint_of_non_finite_weights_is_refused(tmp_path, toy_teacher_cache, one_thread):
    cfg, engine, run, snaps, _ = toy_run(tmp_path, toy_teacher_cache, set(), "train.iters=2")
    run()
    with torch.no_grad():
        engine.params[0].view(-1)[0] = float("inf")
    manager = CheckpointManager(cfg.run.output)
    with pytest.raises(NonFiniteError, match="refusing to write a checkpoint"):
        save_state(cfg, manager, 3, engine)
    manager.close()
    assert ckpt.list_steps(cfg.run.output) == [1, 2]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_zero3_one_rank_nan_teacher_every_rank_skips(tmp_path):
    """2 ZeRO-3 ranks, tiny FLUX, the real rank program; rank 1's teacher returns NaN in step 3 only. Rank 0
    (finite loss) must skip too: the checkpoint after step 3 equals the one after step 2 on every partition."""
    from tests.cluster.flux_fixtures import save_tiny_teacher
    from tests.trainer.ds_spawn import run_ranks
    from tests.trainer.engine_workers import flux_cfg
    from tests.trainer.rank_workers import rank_run
    from trainer.export.pipeline import consolidate

    teacher = save_tiny_teacher(tmp_path / "teacher")
    out = tmp_path / "run"
    cfg = flux_cfg(2, teacher, placement="separate", run={"output": str(out)},
                   teacher={"overlap": False}, train={"iters": 4, "ckpt_every": 1, "ckpt_keep_last": 5})
    run_ranks(rank_run, 2, cfg, {"rank": 1, "at": 2, "kind": "nan"}, timeout=540)
    records = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert [records[s]["nonfinite_skipped"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]  # rank 0's own counter
    assert math.isfinite(records[3]["loss_rank0"]) and math.isnan(records[3]["loss"])  # only rank 1 saw NaN
    assert math.isfinite(records[4]["loss"])
    infos = {s: ckpt.CheckpointInfo(s, f"{out}/checkpoints/{step_dirname(s)}",
                                    read_manifest(f"{out}/checkpoints/{step_dirname(s)}")) for s in (2, 3, 4)}
    for kind in ("master", "exp_avg", "exp_avg_sq", "ema"):
        assert same(consolidate(infos[3], kind), consolidate(infos[2], kind)), kind
        assert not same(consolidate(infos[4], kind), consolidate(infos[3], kind)), kind
    assert json.loads((out / "checkpoints" / step_dirname(3) / "MANIFEST.json").read_text())["meta"]["loss_finite"] is False


def test_nan_injection_from_the_environment(monkeypatch):
    """PIFLOW_INJECT_NAN_TEACHER_STEPS wraps the teacher; a remote client's submit().result() path too."""
    from trainer.fault_injection import with_injected_faults
    from trainer.overlap import Done

    class Submits:  # the interface of cluster.teacher_server.RemoteTeacher (the Ray test uses the real one)
        def submit(self, x, sigma, cond):
            return Done(x * 2)

    def local(x, sigma, cond):
        return x * 2

    monkeypatch.delenv("PIFLOW_INJECT_NAN_TEACHER_STEPS", raising=False)
    assert with_injected_faults(local) is local
    monkeypatch.setenv("PIFLOW_INJECT_NAN_TEACHER_STEPS", "2, 5")
    plain, remote = with_injected_faults(local), with_injected_faults(Submits())
    assert not hasattr(plain, "submit") and hasattr(remote, "submit")  # overlap.submit_to tells them apart
    x = torch.ones(3, 2)
    for step in (1, 2, 3, 5):
        plain.at_step(step)
        remote.at_step(step)
        for u in (plain(x, None, None), remote.submit(x, None, None).result()):
            assert torch.isnan(u[0]).all() == (step in (2, 5)) and torch.equal(u[1:], x[1:] * 2)
    for bad in ("2;3", "0"):
        monkeypatch.setenv("PIFLOW_INJECT_NAN_TEACHER_STEPS", bad)
        with pytest.raises(ValueError, match="PIFLOW_INJECT_NAN_TEACHER_STEPS"):
            with_injected_faults(local)
