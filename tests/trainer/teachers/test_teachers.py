"""The project's own teachers: trained once, cached as safetensors under a key of what determines them."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.toy_helpers import one_thread, tiny_toy_config  # noqa: F401 (fixture)
from trainer.teachers import build as teachers
from trainer.config import ConfigError


def test_cache_roundtrip_and_key(tmp_path, monkeypatch, one_thread):
    cfg = tiny_toy_config(tmp_path, "model.teacher_iters=20")
    path = teachers.ensure_teacher(cfg, progress=False)
    assert path.parent == tmp_path / "teachers" and path.suffix == ".safetensors"
    saved = load_file(str(path))
    net = teachers.load_teacher(cfg, progress=False)
    for k, v in net.state_dict().items():
        assert torch.equal(v, saved[k])
    assert not any(p.requires_grad for p in net.parameters())

    # A second call must not train again.
    def fail(*a, **k):
        raise AssertionError("retrained although cached")
    monkeypatch.setattr(teachers, "train_toy_teacher", fail)
    assert teachers.ensure_teacher(cfg, progress=False) == path
    # Anything that determines the weights changes the key; run-level settings do not.
    assert teachers.teacher_path(tiny_toy_config(tmp_path, "model.teacher_iters=21")) != path
    assert teachers.teacher_path(tiny_toy_config(tmp_path, "model.teacher_iters=20", "train.iters=7")) == path


def test_trained_teacher_lowers_the_flow_matching_loss(tmp_path, one_thread):
    from models.families.toy2d import ToyMixture, ToyVelocityNet, flow_matching_loss

    cfg = tiny_toy_config(tmp_path)
    trained = teachers.train_toy_teacher(cfg, progress=False)
    torch.manual_seed(cfg.model.teacher_seed)
    untrained = ToyVelocityNet(cfg.model.hidden_dim, cfg.model.num_layers)
    x0 = ToyMixture.default().sample(4096, torch.Generator().manual_seed(9))
    with torch.no_grad():
        before = flow_matching_loss(untrained, x0, torch.Generator().manual_seed(1)).item()
        after = flow_matching_loss(trained, x0, torch.Generator().manual_seed(1)).item()
    # The irreducible flow-matching loss of this data is about 1.6 (the 4000-iteration teacher reaches 1.65).
    assert after < 0.75 * before and after < 2.2


def test_family_loads_the_cached_teacher_through_model_pretrained(tmp_path, one_thread):
    from models.families.toy2d import Toy2DFamily, to_image

    cfg = tiny_toy_config(tmp_path, "model.teacher_iters=20")
    path = teachers.ensure_teacher(cfg, progress=False)
    from_cache = teachers.build_teacher(cfg, Toy2DFamily(), progress=False)
    from_file = Toy2DFamily().build_teacher(tiny_toy_config(tmp_path, "model.teacher_iters=20",
                                                            f"model.pretrained={path}"))
    x, sigma = to_image(torch.randn(8, 2)), torch.rand(8)
    torch.testing.assert_close(from_file(x, sigma, None), from_cache(x, sigma, None), rtol=0, atol=0)
    with pytest.raises(ValueError, match="model.pretrained"):
        Toy2DFamily().build_teacher(tiny_toy_config(tmp_path, "model.hidden_dim=16", f"model.pretrained={path}"))


def test_unsupported_family_is_a_config_error(tmp_path):
    cfg = tiny_toy_config(tmp_path, "model.family=flux")
    with pytest.raises(ConfigError, match="model.family"):
        teachers.ensure_teacher(cfg)


def test_training_the_teacher_leaves_the_global_rng_alone(tmp_path, one_thread):
    # a run that trains its teacher first must draw the same numbers afterwards as one that loads it cached
    cfg = tiny_toy_config(tmp_path, "model.teacher_iters=5")
    torch.manual_seed(11)
    before = torch.get_rng_state()
    teachers.ensure_teacher(cfg, progress=False)  # trains (not cached yet)
    assert torch.equal(torch.get_rng_state(), before)
    trained_first = torch.rand(3)
    torch.manual_seed(11)
    teachers.ensure_teacher(cfg, progress=False)  # cached now
    assert torch.equal(torch.rand(3), trained_first)
