"""World-size independence and resharding checkpoints (issue 11), on the real rank program (`run_rank`):
tiny FLUX student (LoRA + GM head, component dropout on), data-free pi-ID, ZeRO-3 over gloo on 1, 2 and 4
CPU ranks, and the single-process torch engine.

- Every random draw of pi-ID is keyed by the global sample index (models/sample_rng.py), so 1, 2 and 4 ranks
  (and the torch engine) give the same losses and weights within 1e-5 after 6 steps.
- A 2-rank run SIGKILLed during step 5 (after its step-4 checkpoint) resumes on 1 rank and matches the
  uninterrupted 1-rank run from step 5 on.
- A checkpoint written at W ranks resumes at W' (torch 1 -> ZeRO-3 2, ZeRO-3 2 -> 4, ZeRO-3 2 -> torch 1):
  weights, Adam moments and the sharded EMA are resharded on load; the continued losses and final weights
  match the uninterrupted run.
"""
from __future__ import annotations

import multiprocessing as mp
import shutil
from pathlib import Path

import pytest
import torch

from tests.trainer.ds_spawn import _entry, _free_port, run_ranks
from tests.trainer.engine_workers import flux_cfg
from tests.trainer.rank_workers import rank_run, rank_runs
from trainer.checkpoint.store import latest_valid, step_dirname
from trainer.export.pipeline import consolidate
from trainer.metrics import read_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # the resharding matrix: its runs fixture trains 1, 2 and 4 ranks (make test-all)
TOL = 1e-5


def run_cfg(teacher_dir: str, world: int, out: Path, engine: str = "deepspeed", **extra) -> dict:
    return flux_cfg(world, teacher_dir, placement="shared", run={"output": str(out), "seed": 3},
                    train={"engine": engine, "iters": 6, "ckpt_every": 2, "ckpt_keep_last": 5, "log_every": 0},
                    **extra)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}  # a resume re-logs: last wins


def final_weights(out: Path, kind: str = "master") -> dict[str, torch.Tensor]:
    info = latest_valid(str(out), "sha256")
    assert info is not None and info.step == 6, info
    return consolidate(info, kind)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def run_until_killed(cfg: dict, fault: dict, attempts: int = 2) -> list:
    """Start 2 ranks that SIGKILL themselves (the fault); returns their exit codes. A rank that fails on its
    own (it reports through the queue, e.g. its rendezvous port was taken meanwhile) stops the others at
    once and the start is retried; the error is raised when every attempt failed."""
    import queue as queue_mod
    import time

    ctx = mp.get_context("spawn")
    for _ in range(attempts):
        error = ""
        q = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_entry, args=(r, 2, port, rank_run, (cfg, fault), q)) for r in range(2)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + 900
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            try:
                rank, status, value = q.get(timeout=1.0)
            except queue_mod.Empty:
                continue
            error = f"rank {rank} {status}: {value}"
            break
        if not error and any(p.is_alive() for p in procs):
            error = "no SIGKILL within 900 s"
        for p in procs:
            p.join(timeout=1 if error else 60)
            if p.is_alive():
                p.kill()
                p.join()
        if not error:
            return [p.exitcode for p in procs]
        shutil.rmtree(cfg["run"]["output"], ignore_errors=True)
    raise RuntimeError(f"the 2-rank run to be killed failed on its own: {error[-3000:]}")  # noqa: F821


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    from tests.cluster.flux_fixtures import save_tiny_teacher

    return save_tiny_teacher(tmp_path_factory.mktemp("flux_teacher"))


@pytest.fixture(scope="module")
def runs(teacher_dir, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted 6-step runs (torch engine; ZeRO-3 on 1, 2 and 4 ranks), the killed 2-rank run and the
    resumed ones. Runs of one world size share their processes (`rank_runs`): starting ranks costs more
    than these tiny runs."""
    root = tmp_path_factory.mktemp("runs")
    o = {name: root / name for name in ("torch", "ds1", "ds2", "ds4", "killed", "t_to_2", "2_to_4", "2_to_t")}
    cfg = lambda world, name, engine="deepspeed": run_cfg(teacher_dir, world, o[name], engine)  # noqa: E731
    run_ranks(rank_runs, 1, [(cfg(1, "torch", "torch"), None), (cfg(1, "ds1"), None)], timeout=900)
    run_ranks(rank_runs, 2, [(cfg(2, "ds2"), None), (cfg(2, "t_to_2"), None, (o["torch"], 2))], timeout=900)
    run_ranks(rank_runs, 4, [(cfg(4, "ds4"), None), (cfg(4, "2_to_4"), None, (o["ds2"], 4))], timeout=900)

    # 2 ranks SIGKILLed during step 5, once the step-4 checkpoint is complete (the teacher double kills)
    killed = cfg(2, "killed")
    killed["teacher"] = {**killed["teacher"], "placement": "separate", "overlap": False}
    fault = {"at": 4, "kind": "kill", "wait_for": str(o["killed"] / "checkpoints" / step_dirname(4) / "MANIFEST.json")}
    o["killed_exitcodes"] = run_until_killed(killed, fault)
    o["killed_before"] = dict(losses(o["killed"]))
    # the same output on 1 rank resumes at step 4; then ZeRO-3 2 ranks -> torch engine
    o["summaries_1"] = run_ranks(rank_runs, 1, [(cfg(1, "killed"), None),
                                                (cfg(1, "2_to_t", "torch"), None, (o["ds2"], 2))], timeout=900)
    return o


@pytest.mark.timeout(3600)
def test_one_two_and_four_ranks_are_the_same_computation(runs):
    ref = losses(runs["ds1"])
    assert sorted(ref) == list(range(1, 7)) and len(set(ref.values())) == 6  # it trains: every loss differs
    ref_w, ref_ema = final_weights(runs["ds1"]), final_weights(runs["ds1"], "ema")
    for name in ("torch", "ds2", "ds4"):
        got = losses(runs[name])
        for step in range(1, 7):
            assert abs(got[step] - ref[step]) <= TOL * max(1.0, abs(ref[step])), (name, step, got[step], ref[step])
        assert max_diff(final_weights(runs[name]), ref_w) <= TOL, name
        assert max_diff(final_weights(runs[name], "ema"), ref_ema) <= TOL, name


@pytest.mark.timeout(3600)
def test_two_ranks_killed_at_step_5_resume_on_one_rank(runs):
    assert runs["killed_exitcodes"] == [-9, -9]  # really killed, not finished
    assert max(runs["killed_before"]) == 4
    assert runs["summaries_1"][0][0]["start_step"] == 4  # resumed from the 2-rank checkpoint of step 4
    ref, got = losses(runs["ds1"]), losses(runs["killed"])
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):  # steps 1-4 from the 2-rank run, 5-6 from the resumed 1-rank run
        assert abs(got[step] - ref[step]) <= TOL * max(1.0, abs(ref[step])), (step, got[step], ref[step])
    assert max_diff(final_weights(runs["killed"]), final_weights(runs["ds1"])) <= TOL
    assert max_diff(final_weights(runs["killed"], "ema"), final_weights(runs["ds1"], "ema")) <= TOL


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name,step", [("t_to_2", 2), ("2_to_4", 4), ("2_to_t", 2)])
def test_checkpoint_reshards_to_another_world_size_and_engine(runs, name, step):
    """torch engine (1) -> ZeRO-3 2 ranks, ZeRO-3 2 -> 4 ranks, ZeRO-3 2 ranks -> torch engine."""
    ref, got = losses(runs["ds1"]), losses(runs[name])
    assert sorted(got) == list(range(step + 1, 7))  # resumed at `step`, not restarted
    for s in got:
        assert abs(got[s] - ref[s]) <= TOL * max(1.0, abs(ref[s])), (s, got[s], ref[s])
    for kind in ("master", "exp_avg", "exp_avg_sq", "ema"):
        assert max_diff(final_weights(runs[name], kind), final_weights(runs["ds1"], kind)) <= TOL, kind


@pytest.mark.timeout(3600)
def test_a_resharding_rank_downloads_only_the_old_ranks_it_needs(runs, tmp_path):
    """Issue 21: the 4-rank checkpoint loaded by each rank of a 2-rank group (the slots a real 2-rank ZeRO-3
    engine has, from ds2's checkpoint of the same step) fetches the state files only of the old ranks whose
    partitions overlap its own, and reads the same partitions as from all four."""
    import json
    import os

    from trainer.checkpoint.store import CheckpointManager, latest_valid
    from trainer.checkpoint.files import STATE_FILE, STATE_META, rank_dirname
    from trainer.torch_engine import Slot

    info = latest_valid(str(runs["ds4"]), "sha256")
    two = latest_valid(str(runs["ds2"]), "sha256")
    assert info.manifest["world_size"] == 4 and two.manifest["world_size"] == 2
    old = {}  # old rank -> {name: (lo, hi)}
    for r in range(4):
        with open(runs["ds4"] / "checkpoints" / step_dirname(info.step) / rank_dirname(r) / STATE_META) as f:
            old[r] = {n: (s, min(s + ln, numel)) for n, _, numel, s, ln in json.load(f)["slots"]}
    for rank in (0, 1):
        with open(runs["ds2"] / "checkpoints" / step_dirname(two.step) / rank_dirname(rank) / STATE_META) as f:
            slots = [Slot(n, tuple(shape), numel, s, ln) for n, shape, numel, s, ln in json.load(f)["slots"]]
        expected = sorted(r for r in range(4) if any(
            max(old[r][s.name][0], s.start) < min(old[r][s.name][1], s.start + s.length, s.numel) for s in slots))
        assert len(expected) < 4  # each new rank holds half: it needs only some old ranks
        partial = CheckpointManager(str(runs["ds4"]), rank=rank, world_size=2, staging_dir=str(tmp_path / f"p{rank}"))
        states, _ = partial.fetch(info, slots)
        assert sorted(states.meta) == expected
        load = tmp_path / f"p{rank}" / "load" / step_dirname(info.step)
        fetched = sorted(p.parent.name for p in load.rglob(STATE_FILE))
        assert fetched == [rank_dirname(r) for r in expected]  # no other old rank's state file came down
        everything = CheckpointManager(str(runs["ds4"]), rank=rank, world_size=2, staging_dir=str(tmp_path / f"a{rank}"))
        full, _ = everything.fetch(info)  # every old rank (the behaviour before issue 21)
        assert sorted(full.meta) == [0, 1, 2, 3]
        for s in slots:
            for kind in ("master", "exp_avg", "ema"):
                assert torch.equal(states.partition(kind, s), full.partition(kind, s)), (rank, s.name, kind)
        assert os.path.exists(load / rank_dirname(rank % 4) / "client.pt")
