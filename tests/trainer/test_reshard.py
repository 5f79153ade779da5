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
from tests.trainer.rank_workers import rank_run
from trainer.checkpoint import latest_valid, step_dirname
from trainer.export import consolidate
from trainer.metrics import read_metrics

pytestmark = [pytest.mark.distributed]
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


def copy_checkpoint(src: Path, step: int, dst: Path) -> None:
    """A fresh run.output holding only `src`'s checkpoint of `step` (resume then starts from it)."""
    name = step_dirname(step)
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    from tests.cluster.flux_fixtures import save_tiny_teacher

    return save_tiny_teacher(tmp_path_factory.mktemp("flux_teacher"))


@pytest.fixture(scope="module")
def runs(teacher_dir, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted 6-step runs: torch engine (1 process) and ZeRO-3 on 1, 2 and 4 ranks."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, world, engine in (("torch", 1, "torch"), ("ds1", 1, "deepspeed"), ("ds2", 2, "deepspeed"),
                                ("ds4", 4, "deepspeed")):
        out[name] = root / name
        run_ranks(rank_run, world, run_cfg(teacher_dir, world, out[name], engine), timeout=600)
    return out


@pytest.mark.timeout(1200)
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


@pytest.mark.timeout(900)
def test_two_ranks_killed_at_step_5_resume_on_one_rank(runs, teacher_dir, tmp_path):
    out = tmp_path / "killed"
    cfg2 = run_cfg(teacher_dir, 2, out)
    manifest = str(out / "checkpoints" / step_dirname(4) / "MANIFEST.json")
    fault = {"at": 4, "kind": "kill", "wait_for": manifest}  # both ranks die in step 5, once step 4 is safe
    cfg2["teacher"] = {**cfg2["teacher"], "placement": "separate", "overlap": False}
    ctx, port = mp.get_context("spawn"), _free_port()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, 2, port, rank_run, (cfg2, fault), queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [-9, -9]  # really killed, not finished
    before = losses(out)
    assert max(before) == 4 and latest_valid(str(out)).step == 4

    run_ranks(rank_run, 1, run_cfg(teacher_dir, 1, out), timeout=600)  # same output, 1 rank: resumes at 4
    ref, got = losses(runs["ds1"]), losses(out)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):  # steps 1-4 from the 2-rank run, 5-6 from the resumed 1-rank run
        assert abs(got[step] - ref[step]) <= TOL * max(1.0, abs(ref[step])), (step, got[step], ref[step])
    assert max_diff(final_weights(out), final_weights(runs["ds1"])) <= TOL
    assert max_diff(final_weights(out, "ema"), final_weights(runs["ds1"], "ema")) <= TOL


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("src,step,world,engine", [("torch", 2, 2, "deepspeed"), ("ds2", 4, 4, "deepspeed"),
                                                   ("ds2", 2, 1, "torch")])
def test_checkpoint_reshards_to_another_world_size_and_engine(runs, teacher_dir, tmp_path, src, step, world, engine):
    out = tmp_path / "resharded"
    copy_checkpoint(runs[src], step, out)
    summaries = run_ranks(rank_run, world, run_cfg(teacher_dir, world, out, engine), timeout=600)
    assert summaries[0]["start_step"] == step  # resumed, not restarted
    ref, got = losses(runs["ds1"]), losses(out)
    assert sorted(got) == list(range(step + 1, 7))
    for s in got:
        assert abs(got[s] - ref[s]) <= TOL * max(1.0, abs(ref[s])), (s, got[s], ref[s])
    for kind in ("master", "exp_avg", "exp_avg_sq", "ema"):
        assert max_diff(final_weights(out, kind), final_weights(runs["ds1"], kind)) <= TOL, kind
