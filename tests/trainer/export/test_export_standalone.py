"""Exports that stand alone: the tiny digits student, exported, loads with `diffusers.DiffusionPipeline.from_pretrained
(DIR, trust_remote_code=True)` in a process whose PYTHONPATH is cleared, whose cwd is elsewhere and which cannot
import this project (an import blocker proves it), and gives the images `piflow sample` gives for the same seeds.
A LoRA student also exports its adapter in diffusers' LoRA naming and its GM head as their own safetensors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.families import get_family
from trainer.config import config_from_dict
from tests.trainer.export.test_export import ROOT, train_and_checkpoint

PROMPTS = ["a handwritten seven", "a handwritten three"]

DIFFUSERS_ONLY = r"""
import importlib.abc, json, sys
BLOCKED = {"models", "trainer", "cluster", "data_pipeline", "piflow"}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name}: this project must not be needed to load an export")
sys.meta_path.insert(0, Blocker())
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.to("cpu")
prompts = sys.argv[3].split("|")
gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(2 * len(prompts))]
kw = dict(num_images_per_prompt=2, num_inference_steps=4, negative_prompt=None)
latents = pipe(prompts, generator=gens(), output_type="latent", **kw).images
torch.save(latents, sys.argv[2] + ".pt")
images = [latents[0]]
if len(sys.argv) < 5:  # tiny bases without a VAE stop at latents
    images = pipe(prompts, generator=gens(), **kw).images  # output_type "pil" is the default
    np.save(sys.argv[2] + ".npy", np.stack([np.asarray(im) for im in images]))
offload = set(pipe.model_cpu_offload_seq.split("->"))
modules = {k for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
print(json.dumps({"class": type(pipe).__name__, "modules": sorted(modules), "offload_covers": modules <= offload,
                  "project_imported": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
                  "pil": type(images[0]).__name__, "size": list(images[0].size) if type(images[0]).__name__ == "Image" else []}))
"""


def digits_run(tmp_path, steps=2):
    data = yaml.safe_load((ROOT / "configs" / "digits_demo.yaml").read_text())
    data["run"]["output"] = str(tmp_path / "run")
    data["model"]["pretrained"] = str(ROOT / "assets" / "teachers" / "digits")
    data["distill"]["total_substeps"] = 16
    data["ema"]["start"] = 0
    data["train"].update(engine="torch", batch_size=2)
    data["cluster"]["student"]["workers"] = 1
    cfg = config_from_dict(data)
    torch.manual_seed(cfg.run.seed)
    student = get_family("digits").build_student(cfg, teacher=None)
    from models.families import load_text_encoder

    cond = load_text_encoder(cfg)(PROMPTS)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    train_and_checkpoint(cfg, student, steps, lambda it: student.make_policy(x, torch.full((2,), 0.7), cond)
                         .means.pow(2).mean())
    return cfg


def run_diffusers_only(export: Path, tmp_path: Path, prompts: list[str], *extra: str) -> dict:
    """Load and sample `export` in a process with PYTHONPATH cleared, another cwd and this project blocked."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    clean.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    r = subprocess.run([sys.executable, "-c", DIFFUSERS_ONLY, str(export), str(tmp_path / "standalone"),
                        "|".join(prompts), *extra], capture_output=True, text=True, cwd=str(elsewhere), timeout=300,
                       env=clean)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_digits_export_loads_with_diffusers_alone_and_matches_piflow_sample(tmp_path):
    digits_run(tmp_path)
    (tmp_path / "demo_table.md").write_text("| method | NFE | prompt accuracy |\n| --- | --- | --- |\n| student | 4 | 98.8% |")
    out = tmp_path / "export"
    from cluster.cli import main

    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_piflow", "PiFlowPipeline"]
    assert {k for k, v in index.items() if isinstance(v, list) and k != "_class_name"} == {
        "transformer", "policy_head", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"}
    card = (out / "README.md").read_text()
    assert "4-step pi-Flow student" in card and "| policy | GM, K = 8 |" in card and "training step 2" in card
    assert "| student | 4 | 98.8% |" in card  # the run's evaluation table

    prompts = sum((["--prompt", p] for p in PROMPTS), [])
    assert main(["sample", str(out), *prompts, "--num", "2", "--seed", "100", "--nfe", "4",
                 "--out", str(tmp_path / "sample.png")]) == 0
    expected = torch.load(tmp_path / "sample.pt", weights_only=True)  # (4, 1, 8, 8)

    info = run_diffusers_only(out, tmp_path, PROMPTS)
    assert info["class"] == "PiFlowPipeline" and info["project_imported"] == [] and info["offload_covers"]
    assert info["modules"] == ["policy_head", "text_encoder", "text_encoder_2", "transformer"]
    assert info["pil"] == "Image" and info["size"] == [8, 8]
    got = torch.load(tmp_path / "standalone.pt", weights_only=True)
    assert got.shape == expected.shape and (got - expected).abs().max() < 1e-5, (got - expected).abs().max()
    assert expected.std() > 0.1  # real samples, not a constant
    pixels = ((expected.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)[:, 0].numpy()
    images = np.load(tmp_path / "standalone.npy")
    assert np.abs(images.astype(int) - pixels.astype(int)).max() <= 1  # the same images, to rounding


def test_lora_export_writes_the_adapter_in_diffusers_naming_and_merges_exactly(tmp_path):
    """The FLUX recipe's LoRA student (its tiny same-family model): `lora/pytorch_lora_weights.safetensors` holds
    `transformer.<module>.lora_{A,B}.weight` for every adapted module, the head is its own file, and the merged
    transformer reproduces the student's trunk."""
    from safetensors.torch import load_file

    from models.pipeline import PiFlowStudent
    from trainer.export.standalone import merged_transformer_state, write_standalone

    from tests.recipes import FP32, recipe_config

    cfg = recipe_config("flux", *FP32, output=str(tmp_path / "run"))
    torch.manual_seed(0)
    model = PiFlowStudent(piflow=cfg.to_dict(), kind="lora")
    student = model.student.eval()  # no LoRA dropout
    with torch.no_grad():
        for n, p in student.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # as after training
    assert write_standalone(model, cfg, tmp_path / "export", step=8)
    lora = load_file(str(tmp_path / "export" / "lora" / "pytorch_lora_weights.safetensors"))
    adapted = {n.split(".lora_")[0] for n, _ in student.transformer.named_parameters() if "lora_A" in n}
    assert {k.rsplit(".lora_", 1)[0] for k in lora} == {f"transformer.{m}" for m in adapted}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora)
    head = load_file(str(tmp_path / "export" / "lora" / "policy_head.safetensors"))
    assert set(head) == set(student.head.state_dict())
    # merged weights: a plain FluxTransformer2DModel gives the student's trunk features (norm_out input)
    from diffusers import FluxTransformer2DModel

    clean = FluxTransformer2DModel.from_pretrained(str(tmp_path / "export" / "transformer"))
    fam = get_family("flux")
    x, s = torch.randn(2, 16, 8, 8), torch.tensor([0.9, 0.4])
    c = {"prompt_embeds": torch.randn(2, 5, 32), "pooled_prompt_embeds": torch.randn(2, 32)}
    captured = {}
    clean.proj_out.register_forward_pre_hook(lambda m, a: captured.setdefault("h", a[0]))
    with torch.no_grad():
        clean(**fam.network_inputs(cfg, clean, x, s, c), return_dict=False)
        student._trunk(x, s, c)
        ours = fam.head_inputs(student.tail, student._taps, student.transformer)[0]
    assert (captured["h"] - ours).abs().max() < 1e-5
    assert set(merged_transformer_state(student)) == set(clean.state_dict())
    card = (tmp_path / "export" / "README.md").read_text()
    assert "license: other" in card and "LoRA | rank 256, alpha 256" in card  # the recipe's
