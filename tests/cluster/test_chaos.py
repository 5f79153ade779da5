"""The short chaos soak (benchmarks/chaos.py --short, issue 12) in the suite, so the property never rots: the
digits demo through `piflow train` (embedded Ray, 2 ZeRO-3 ranks, TeacherServer, DataWorker, BatchFeed),
prompt shards and run.output on the moto S3 server behind a proxy injecting 503/500/resets/slow answers,
one NaN teacher batch (trainer/fault_injection.py) in both runs, 60 steps, and 3 SIGKILLs at fixed steps: a student
rank, the BatchFeed, and the whole `piflow train` session while a checkpoint is being uploaded (then the same
command again). Every step's loss equals an uninterrupted run's within 1e-5 except the NaN step, which both
runs skip; the consumed sample keys are identical, and no checkpoint ever fails its sha256 check."""
import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.soak, pytest.mark.slow, pytest.mark.ray, pytest.mark.distributed, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]


def _chaos():
    spec = importlib.util.spec_from_file_location("chaos", ROOT / "benchmarks" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_short_chaos_soak(tmp_path):
    chaos = _chaos()
    report = chaos.run_soak(tmp_path / "soak", 60, chaos.SHORT_KINDS, seed=0, ckpt_every=20)
    print(chaos.format_report(report))
    assert [f["kind"] for f in report["faults"]] == ["student_rank", "driver_in_upload", "feed"]
    assert all(f["pid"] for f in report["faults"])
    assert report["faults"][0]["killed_at_step"] < 20  # before the first checkpoint: a fresh restart
    # step 25 lies between checkpoints 20 and 40: the driver killed during 40's write resumes from 20 and replays it
    assert report["output_on_s3"] and report["nan_step"] == 25
    assert report["bars"] == {k: True for k in report["bars"]}, chaos.format_report(report)
    assert report["max_loss_diff"] <= 1e-5
    assert sum(report["s3_faults_injected"].values()) > 0  # the store really misbehaved
