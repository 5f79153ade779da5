"""Export: a checkpoint's EMA student -> diffusers-format dir -> `PiFlowPipeline.from_pretrained` in a FRESH
process gives the training-time sampler's latents for the same seeds (toy full-weight export, the FLUX recipe's LoRA
export); `piflow sample` writes a PNG and the latents; ZeRO-3 partitions consolidate to the gathered EMA."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.families import get_family
from models.sampling import sample
from trainer.checkpoint.store import CheckpointManager
from trainer.config import config_from_dict
from trainer.ema import PowerEMA
from trainer.torch_engine import TorchEngine
from trainer.checkpoint.resume import save_state

ROOT = Path(__file__).resolve().parents[3]

LOAD_AND_SAMPLE = r"""
import sys, torch
from models.pipeline import PiFlowPipeline
pipe = PiFlowPipeline.from_pretrained(sys.argv[1])
prompts = [p for p in sys.argv[3].split("|") if p] or None
n = len(prompts) if prompts else int(sys.argv[4])
gens = [torch.Generator().manual_seed(100 + i) for i in range(n)]
torch.save(pipe(prompt=prompts, num_inference_steps=int(sys.argv[5]), generator=gens,
               num_images=1 if prompts else n), sys.argv[2])
"""


def fresh_process_latents(export_dir: Path, out: Path, prompts: list[str], num: int, nfe: int) -> torch.Tensor:
    result = subprocess.run([sys.executable, "-c", LOAD_AND_SAMPLE, str(export_dir), str(out), "|".join(prompts),
                             str(num), str(nfe)], capture_output=True, text=True, cwd=str(ROOT), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def train_and_checkpoint(cfg, student, steps: int, loss_fn) -> PowerEMA:
    engine = TorchEngine(cfg, student)
    ema = PowerEMA(student.parameters(), gamma=cfg.ema.gamma, start=cfg.ema.start)
    for it in range(steps):
        engine.backward(loss_fn(it))
        engine.step()
        ema.update(it)
    manager = CheckpointManager(cfg.run.output)
    save_state(cfg, manager, steps, engine, ema, student)
    manager.close()
    return ema


def reference_latents(student, ema, cond, num: int, nfe: int, cfg) -> torch.Tensor:
    noise = torch.stack([torch.randn(tuple(get_family(cfg.model.family).latent_shape(cfg)),
                                     generator=torch.Generator().manual_seed(100 + i)) for i in range(num)])
    student.eval()
    d = cfg.distill
    with ema.applied():
        return sample(lambda x, s: student.make_policy(x, s, cond), noise, nfe, d.final_step_scale, d.shift,
                      d.total_substeps)


@pytest.mark.slow
def test_toy_full_export_matches_training_sampler_in_a_fresh_process(tmp_path):
    from models.families.toy2d import ToyVelocityNet

    cfg = config_from_dict({
        "run": {"output": str(tmp_path / "run"), "seed": 2},
        "model": {"family": "toy2d", "latent_channels": 2, "latent_size": 1, "hidden_dim": 16, "num_layers": 2},
        "policy": {"num_components": 3, "logstd_inner_dim": 8},
        "distill": {"nfe": 2, "total_substeps": 16, "shift": 1.0},
        "optim": {"lr": 0.01, "warmup_iters": 0}, "ema": {"start": 0},
    })
    torch.manual_seed(0)
    student = get_family("toy2d").build_student(cfg, ToyVelocityNet(16, 2))
    x = torch.randn(8, 2, 1, 1)
    ema = train_and_checkpoint(cfg, student, 3, lambda it: student.make_policy(x, torch.full((8,), 0.9)).means.pow(2).mean())

    out = tmp_path / "export"
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "export", str(tmp_path / "run"), "--out", str(out)],
                            capture_output=True, text=True, cwd=str(ROOT), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "PiFlowPipeline"
    from trainer.export.pipeline import export_summary

    meta = export_summary(out)
    assert meta["kind"] == "full" and meta["family"] == "toy2d" and json.loads(meta["policy"])["type"] == "gm"

    expected = reference_latents(student, ema, None, 5, 2, cfg)
    got = fresh_process_latents(out, tmp_path / "lat.pt", [], 5, 2)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0), (got - expected).abs().max()
    # the EMA, not the live weights, was exported
    live = sample(lambda x, s: student.make_policy(x, s, None), torch.stack(
        [torch.randn(2, 1, 1, generator=torch.Generator().manual_seed(100 + i)) for i in range(5)]), 2, 0.5, 1.0, 16)
    assert not torch.allclose(live, expected, atol=1e-4)

    png = tmp_path / "sample.png"
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "sample", str(tmp_path / "run"), "--nfe", "2",
                             "--num", "5", "--seed", "100", "--out", str(png)],
                            capture_output=True, text=True, cwd=str(ROOT), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.allclose(torch.load(tmp_path / "sample.pt", weights_only=True), expected, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_flux_lora_export_matches_training_sampler_in_a_fresh_process(tmp_path):
    from tests.recipes import FP32, recipe_dict

    data = recipe_dict("flux", *FP32, output=str(tmp_path / "run"))
    data["policy"]["num_components"] = 2
    data["distill"]["total_substeps"] = 16
    data["ema"]["start"] = 0
    cfg = config_from_dict(data)
    family = get_family("flux")
    torch.manual_seed(cfg.run.seed)
    student = family.build_student(cfg, teacher=None)
    from models.families import load_text_encoder

    prompts = ["a red cat", "a handwritten seven"]
    cond = load_text_encoder(cfg)(prompts)
    x = torch.randn(2, 16, 8, 8)

    def loss(it):
        return student.make_policy(x, torch.full((2,), 0.8), cond).means.pow(2).mean()

    ema = train_and_checkpoint(cfg, student, 3, loss)
    from trainer.export.pipeline import export_student, export_summary

    out = tmp_path / "export"
    export_student(str(tmp_path / "run"), out)
    meta = export_summary(out)
    assert meta["kind"] == "lora" and meta["base_model"] == cfg.model.pretrained
    from safetensors.torch import load_file

    saved = load_file(str(out / "student" / "diffusion_pytorch_model.safetensors"))
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert set(saved) == trained and any("lora_B" in n for n in saved) and any(n.startswith("head.") for n in saved)
    with ema.applied():
        params = dict(student.named_parameters())
        assert all(torch.equal(saved[n], params[n].detach()) for n in saved)

    expected = reference_latents(student, ema, cond, 2, 2, cfg)
    got = fresh_process_latents(out, tmp_path / "lat.pt", prompts, 2, 2)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
