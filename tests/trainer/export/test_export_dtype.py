"""Issue 23 item 7: an export keeps the recipe's dtype. A bf16 run's standalone transformer (`transformer/`, the
LoRA merged into the base) is written in bf16 like the base it came from, not as float32 (the FLUX base: 47.6 GB
instead of 23.8, about 100 GB of RAM to write); an fp32 recipe stays fp32. The merged weights load with plain
diffusers and equal W + scaling B A computed here (in float32, rounded once to the recipe's dtype)."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from tests.trainer.speed_workers import tiny_cfg
from trainer.config import config_from_dict


def _export(tmp_path, precision: str):
    from models.pipeline import PiFlowStudent
    from trainer.export.standalone import write_standalone

    dtype = "bfloat16" if precision == "bf16" else "float32"
    cfg = config_from_dict(tiny_cfg("flux", run={"output": str(tmp_path / "run")}, train={"precision": precision},
                                    model={"dtype": dtype}))
    torch.manual_seed(0)
    model = PiFlowStudent(piflow=cfg.to_dict(), kind="lora")
    with torch.no_grad():
        for n, p in model.student.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # as after training
    assert write_standalone(model, cfg, tmp_path / "export", step=1)
    with safe_open(str(tmp_path / "export" / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    return model.student, dtypes


@pytest.mark.parametrize("precision,expected", [("bf16", {"BF16"}), ("fp32", {"F32"})])
def test_standalone_transformer_keeps_the_recipe_dtype(tmp_path, precision, expected):
    from diffusers import FluxTransformer2DModel

    student, dtypes = _export(tmp_path, precision)
    assert dtypes == expected
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    loaded = FluxTransformer2DModel.from_pretrained(str(tmp_path / "export" / "transformer"), torch_dtype=dtype)
    name = "transformer_blocks.0.ff.net.2"  # a LoRA target: merged W + scaling * B @ A
    layer = student.transformer.get_submodule(name)
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    merged = layer.base_layer.weight.float() + layer.scaling["default"] * (b @ a)
    got = loaded.get_submodule(name).weight
    assert torch.equal(got, merged.to(got.dtype))
