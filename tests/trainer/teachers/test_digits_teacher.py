"""The embedded default's teacher: trained by the project, saved in the diffusers layout, loaded back through the
digits family (the code path the demo and the TeacherServer use)."""
import json
from pathlib import Path

import pytest
import torch

from trainer.config import ConfigError, load_config

OVERRIDES = ["model.teacher_iters=3", "model.teacher_batch_size=8"]
DEMO = Path(__file__).resolve().parents[3] / "configs" / "digits_demo.yaml"


def digits_cfg(tmp_path, *extra):
    return load_config(DEMO, [f"model.pretrained={tmp_path / 'teacher'}", *OVERRIDES, *extra])


def test_train_save_load_roundtrip(tmp_path):
    from models.families import get_family, load_text_encoder
    from trainer.teachers.build import ensure_teacher

    cfg = digits_cfg(tmp_path)
    path = ensure_teacher(cfg, progress=False)
    record = json.loads((path / "teacher.json").read_text())
    assert record["spec"]["iters"] == 3 and record["spec"]["family"] == "digits"
    assert all((path / sub).is_dir() for sub in ("transformer", "text_encoder", "text_encoder_2", "tokenizer"))

    family = get_family("digits")
    assert family.latent_shape(cfg) == (1, 8, 8) and not family.uses_vae
    teacher = family.build_teacher(cfg)  # from_pretrained of the saved transformer
    cond = load_text_encoder(cfg)(["a handwritten seven", "a handwritten one"])
    assert cond["prompt_embeds"].shape == (2, 8, 32) and cond["pooled_prompt_embeds"].shape == (2, 32)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.3])
    u = teacher(x, sigma, cond)
    # The same weights called directly through diffusers with the family's inputs give the same velocity.
    from diffusers import FluxTransformer2DModel

    net = FluxTransformer2DModel.from_pretrained(str(path), subfolder="transformer").eval()
    with torch.no_grad():
        ref = family.teacher_velocity(cfg, net, x, sigma, cond)
    assert u.dtype == torch.float32 and torch.allclose(u, ref, atol=1e-6)
    assert not torch.allclose(u[0], u[1])  # conditioning and sigma matter

    # Reused when the spec matches (no retraining: the files stay untouched) ...
    mtime = (path / "teacher.json").stat().st_mtime_ns
    assert ensure_teacher(cfg, progress=False) == path
    assert (path / "teacher.json").stat().st_mtime_ns == mtime
    # ... and a clear error naming the differing keys when it does not.
    with pytest.raises(ConfigError, match="iters.*--force"):
        ensure_teacher(digits_cfg(tmp_path, "model.teacher_iters=4"), progress=False)


def test_digits_teacher_needs_a_directory():
    from trainer.teachers.build import ensure_teacher

    cfg = load_config(DEMO, ["model.pretrained="])
    with pytest.raises(ConfigError, match="model.pretrained"):
        ensure_teacher(cfg, progress=False)
