"""`benchmarks/gpu_step.py --tiny` runs the GPU step check's whole code path on CPU (so it never rots before the
lead runs it on a GPU): the table's fields are measured, positive and consistent, and the JSON is written."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)


def test_gpu_step_tiny_writes_its_measurements(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"
    spec = importlib.util.spec_from_file_location("gpu_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu_step.json"
    result = bench.main(["--tiny", "--iters", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["device"] == "cpu" and result["K"] == 8 and result["substeps"] == 128
    assert result["student_fwd_bwd_tflop"] > 0 and result["teacher_tflops_achieved"] > 0
    assert result["student_fwd_bwd_s"] > 0 and result["gm_rollout_over_student_fwd"] > 0
    assert result["teacher_samples_per_s"] == pytest.approx(result["teacher_batch"] / result["teacher_fwd_s"])
    assert all(v > 0 for v in result["plan_parts_gib"].values())
    assert result["mfu"] is None  # no known peak on CPU
    assert "GM rollout (K=8, 128 substeps)" in capsys.readouterr().out
