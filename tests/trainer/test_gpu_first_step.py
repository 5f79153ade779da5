"""The first GPU step (tier `gpu`, skipped without CUDA; issue 13): the tiny recipe of every family runs its
first steps on a CUDA device through the real rank program (`run_rank`: ZeRO-3 over NCCL, the teacher where the
recipe puts it), in bf16 as the recipes train and in fp32 against the same run on the CPU; the bf16 run's export
samples on the GPU. What CPU-only tests can only emulate (tests/test_device_placement.py): every tensor the rank
program, the teacher and the pipeline make lands on the device of the module that consumes it."""
from __future__ import annotations

import json

import pytest
import torch

from tests.trainer.bf16_workers import run_recipe
from tests.trainer.ds_spawn import run_ranks
from tests.recipes import recipe_path
from tests.trainer.test_bf16 import _cfg

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]


def _losses(summary: dict) -> list[float]:
    return [json.loads(line)["loss"] for line in open(summary["metrics_path"]) if '"loss"' in line]


def _one_rank(cfg, accelerator: str) -> dict:
    d = cfg.to_dict()
    d["cluster"]["student"]["workers"] = 1
    (summary,) = run_ranks(run_recipe, 1, d, timeout=600, accelerator=accelerator)
    return summary


@pytest.mark.parametrize("family", ["flux", "qwen_image", "dit"])
def test_first_steps_on_cuda(family, tmp_path):
    from models.pipeline import PiFlowPipeline
    from trainer.export.pipeline import export_student
    from trainer.config import load_config

    # the recipe's tiny model is read from a saved dir (tests/recipes.py): the same weights on both devices
    fp32 = {}
    for accelerator in ("cuda", "cpu"):
        cfg = _cfg(family, "fp32", str(tmp_path / f"fp32_{accelerator}"))
        cfg.lora.dropout = 0.0  # LoRA dropout masks come from the device's RNG: not the same numbers on CPU and GPU
        cfg.eval.every = 0  # the tiny text encoders are not in the teacher dir
        fp32[accelerator] = _one_rank(cfg, accelerator)
    fp32_gpu, fp32_cpu = fp32["cuda"], fp32["cpu"]
    bf16_gpu = _one_rank(_cfg(family, "bf16", str(tmp_path / "bf16_gpu")), "cuda")
    for s in (fp32_gpu, fp32_cpu, bf16_gpu):
        assert s["steps"] == 5 and s["checkpoint_steps"] == [5]
    assert bf16_gpu["dtypes"] == {"params": ["bfloat16"], "master": ["float32"], "ema": ["float32"]}
    # the same computation on the GPU and the CPU: fp32 (cuDNN may use TF32 for DiT's patch convolution: ~1e-3)
    l_gpu, l_cpu, l_bf16 = _losses(fp32_gpu), _losses(fp32_cpu), _losses(bf16_gpu)
    assert len(l_gpu) == len(l_cpu) == len(l_bf16) == 5
    # LoRA A is initialised from the device's RNG (B = 0, so step 1 does not see it): LoRA families match at
    # step 1 and stay close after; the full fine-tune (DiT) matches at every step
    assert l_gpu[0] == pytest.approx(l_cpu[0], rel=1e-2)
    for a, b in zip(l_gpu, l_cpu):
        assert a == pytest.approx(b, rel=1e-2 if family == "dit" else 0.2)
    assert all(torch.isfinite(torch.tensor(l_bf16))) and sum(l_bf16) == pytest.approx(sum(l_gpu), rel=0.2)
    # the bf16 run's export samples on the GPU like on the CPU
    export_student(str(tmp_path / "bf16_gpu"), tmp_path / "export")
    pipe = PiFlowPipeline.from_pretrained(str(tmp_path / "export"))
    prompt = load_config(recipe_path(family)).eval.prompts[0]
    x_cpu = pipe(prompt, num_images=2, generator=torch.Generator().manual_seed(0))
    x_gpu = pipe.to("cuda")(prompt, num_images=2, generator=torch.Generator().manual_seed(0))
    assert x_gpu.device.type == "cuda" and bool(torch.isfinite(x_gpu).all())
    torch.testing.assert_close(x_gpu.cpu(), x_cpu, rtol=1e-2, atol=1e-2)


def test_gpu_step_benchmark_runs(tmp_path):
    """benchmarks/gpu_step.py at real FLUX width (1 double + 1 single block, 512^2) writes its numbers."""
    import subprocess
    import sys

    out = tmp_path / "gpu_step.json"
    subprocess.run([sys.executable, "benchmarks/gpu_step.py", "--single", "1", "--resolution", "512",
                    "--repeat", "3", "--out", str(out)], check=True, timeout=600)
    r = json.loads(out.read_text())
    assert r["hidden"] == 3072 and r["image_tokens"] == 1024
    assert 0 < r["mfu_vs_measured_matmul"] < 1.0 and r["memory_peak_gib"] > r["memory_static_gib"] > 0
