"""`benchmarks/gpu_step.py --tiny` runs the GPU step check's whole code path on CPU (so it never rots between GPU
runs): the measurements are positive and consistent, the FLOPs are counted, and the JSON is what it returns."""
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
    result = bench.main(["--tiny", "--repeat", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["device"] == "cpu" and result["K"] == 8 and result["tiny"]
    assert result["fwd_bwd_flops"] > 2 * result["fwd_flops"] > 0  # a backward costs about two forwards
    assert result["student_fwd_bwd_s"] > 0 and result["rollout_over_student_fwd"] > 0
    assert result["teacher_latents_per_s"] == pytest.approx(result["teacher_request_latents"] / result["teacher_fwd_s"])
    assert result["trainable_parameters"] < result["parameters"]  # LoRA + head + norm only
    assert "GM rollout 128 substeps" in capsys.readouterr().out
