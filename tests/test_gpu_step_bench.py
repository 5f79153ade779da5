"""`benchmarks/gpu_step.py --tiny` runs the GPU step check's whole code path on CPU (so it never rots between GPU
runs): the measurements are positive and consistent, the FLOPs are counted, and the JSON goes to a temporary
file, never over the committed GPU figures. Its student is the trainer's (issue 23 item 3): built partitioned
under the ZeRO-3 engine of one rank, so in a bf16 run every matmul of its forward and backward is bf16 (the
first version ran LoRA A/B, the GM head and norm_out in float32)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(900)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def test_gpu_step_tiny_writes_its_measurements_to_a_temporary_file(tmp_path):
    committed = ROOT / "benchmarks" / "results" / "gpu_step.json"
    before = _digest(committed)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--tiny", "--repeat", "1"],
                          cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _digest(committed) == before  # the H200 figures stay
    out = Path(done.stdout.strip().splitlines()[-1].removeprefix("wrote "))
    assert out.is_relative_to(tmp_path) and out.exists()
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["K"] == 8 and result["tiny"] and result["precision"] == "fp32"
    assert result["fwd_bwd_flops"] > 2 * result["fwd_flops"] > 0  # a backward costs about two forwards
    assert result["student_fwd_bwd_s"] > 0 and result["rollout_over_student_fwd"] > 0
    assert result["teacher_latents_per_s"] == pytest.approx(result["teacher_request_latents"] / result["teacher_fwd_s"])
    assert 0 < result["trainable_parameters"] < result["parameters"]  # LoRA + head + norm only
    assert "GM rollout 128 substeps" in done.stdout


def bf16_student_step() -> dict:
    """(one rank) the benchmark's tiny bf16 student: the dtypes of every matmul of a forward + backward."""
    import importlib.util

    import torch

    from tests.trainer.matmul_dtypes import MatmulDtypes

    spec = importlib.util.spec_from_file_location("gpu_step", ROOT / "benchmarks" / "gpu_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.argparse.Namespace(tiny=True, resolution=64, text_tokens=8, batch=2, precision="bf16",
                                    attention="auto", compile="none", checkpointing=True, double=1, single=1)
    cfg, family, conf, student, teacher, engine = bench.build(args, torch.device("cpu"))
    C, H, W = family.latent_shape(cfg)
    cond = bench.conditioning(cfg, conf, 2, "cpu", torch.bfloat16)
    with MatmulDtypes() as seen:
        engine.backward(bench.policy_loss(student.make_policy(torch.randn(2, C, H, W), torch.ones(2), cond)))
        teacher(torch.randn(4, C, H, W), torch.rand(4), {k: v.repeat(2, *[1] * (v.dim() - 1)) for k, v in cond.items()})
    return {**seen.summary(), "params": sorted({str(p.dtype) for p in engine.params}),
            "masters": sorted({str(engine.local_master(p).dtype) for p in engine.params})}


@pytest.mark.distributed
def test_the_benchmark_student_multiplies_in_bf16():
    from tests.trainer.ds_spawn import run_ranks

    (seen,) = run_ranks(bf16_student_step, 1, timeout=800)
    assert seen["other"] == {}, f"matmuls not in bf16: {seen['other']}"
    assert seen["counts"].get("mm bfloat16", 0) > 20
    assert seen["params"] == ["torch.bfloat16"] and seen["masters"] == ["torch.float32"]
