"""Validation rollouts: the shard, preview and metrics under rollouts/step_N, checked against an independent
call of the sampler; wandb (offline) receives the preview image; a local run writes them every eval.every."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.families.toy2d import Toy2DFamily, ToyVelocityNet
from models.sampling import sample
from trainer.config import config_from_dict
from trainer.evaluation.rollouts import RolloutHook, validation_noise


def toy_cfg(output, **eval_cfg):
    return config_from_dict({
        "run": {"output": str(output), "seed": 1},
        "model": {"family": "toy2d", "latent_channels": 2, "latent_size": 1, "hidden_dim": 16, "num_layers": 2},
        "policy": {"num_components": 3, "logstd_inner_dim": 8},
        "distill": {"nfe": 3, "total_substeps": 12, "shift": 1.0},
        "eval": {"every": 2, "nfe": 3, "num_samples": 6, "seed": 40, "temperature": "auto", **eval_cfg},
    })


def toy_student(cfg):
    torch.manual_seed(0)
    return Toy2DFamily().build_student(cfg, ToyVelocityNet(16, 2), generator=torch.Generator().manual_seed(0))


def read_shard(path: Path) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset(str(path), shardshuffle=False).decode())


def test_rollout_writes_states_preview_and_metrics_matching_the_sampler(tmp_path):
    cfg = toy_cfg(tmp_path / "run")
    student = toy_student(cfg)
    hook = RolloutHook(cfg, Toy2DFamily(), student)
    metrics = hook(step=4)
    hook.close()  # the upload is asynchronous (issue 12)

    out = tmp_path / "run" / "rollouts" / "step_00000004"
    samples = read_shard(out / "latents.tar")
    assert [s["__key__"] for s in samples] == [f"sample_{i:05d}" for i in range(6)]
    noise = torch.stack([torch.randn(2, 1, 1, generator=torch.Generator().manual_seed(40 + i)) for i in range(6)])
    x0, trajectory = sample(lambda x, s: student.make_policy(x, s, None), noise, 3, 0.5, 1.0, 12,
                            temperature=0.2, return_trajectory=True)  # 'auto' at 3 NFE = 0.2
    for i, s in enumerate(samples):
        states = torch.from_numpy(s["states.npy"])
        assert states.shape == (4, 2, 1, 1)  # noise + one state per step
        assert torch.equal(states[0], noise[i])
        for k in range(4):
            assert torch.allclose(states[k], trajectory[k][i], atol=1e-6, rtol=0)
        assert np.array_equal(s["final.npy"], s["states.npy"][-1])
        assert s["json"] == {"prompt": None, "seed": 40 + i}

    record = json.loads((out / "metrics.json").read_text())
    assert record["step"] == 4 and record["nfe"] == 3 and record["seeds"] == list(range(40, 46))
    assert len(record["policy"]) == 3 and all("logstd_mean" in p for p in record["policy"])
    logw = student.make_policy(noise, torch.ones(6), None).logweights.detach()
    assert record["policy"][0]["weight_max_mean"] == pytest.approx(float(logw.exp().amax(1).mean()), abs=1e-6)
    assert metrics["rollout/x0_mean"] == pytest.approx(float(x0.mean()), abs=1e-6)
    image = Image.open(out / "preview.png")
    assert image.format == "PNG" and image.size[0] > 100  # the 2-D toy's scatter plot


def test_validation_noise_is_per_sample_seeded():
    cfg = toy_cfg("unused")
    a = validation_noise(cfg, (2, 1, 1), num=3)
    b = validation_noise(cfg, (2, 1, 1), num=5)
    assert torch.equal(a, b[:3])  # sample i depends on eval.seed + i only


def test_preview_of_decoded_images_is_a_grid(tmp_path):
    from trainer.evaluation.rollouts import preview_png

    images = torch.linspace(-1, 1, 5 * 3 * 4 * 4).view(5, 3, 4, 4)
    png = preview_png(torch.zeros(5, 4, 4, 4), images)
    grid = np.asarray(Image.open(io.BytesIO(png)))
    assert grid.shape == (4, 20, 3)  # 5 images in one row of up to 8
    expected = ((images[1].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(grid[:, 4:8], expected)


def test_preview_goes_to_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    from trainer.metrics import MetricsLogger

    cfg = config_from_dict({"run": {"output": str(tmp_path / "run")}, "model": {"family": "toy2d"},
                            "eval": {"every": 1, "num_samples": 4}, "wandb": {"mode": "offline"},
                            "policy": {"num_components": 2, "logstd_inner_dim": 8},
                            "distill": {"nfe": 2, "total_substeps": 8}})
    cfg.model.hidden_dim, cfg.model.num_layers = 16, 2
    logger = MetricsLogger(cfg, tmp_path / "run")
    try:
        hook = RolloutHook(cfg, Toy2DFamily(), toy_student(cfg), logger=logger)
        hook(step=1)
        hook.close()
    finally:
        logger.close()
    images = list(tmp_path.rglob("media/images/rollout/preview_*.png"))  # the key "rollout/preview"
    assert len(images) == 1
    assert Image.open(images[0]).size == Image.open(tmp_path / "run/rollouts/step_00000001/preview.png").size


def test_local_run_writes_rollouts_every_eval_every(tmp_path):
    from trainer.local_run import run_local

    cfg = toy_cfg(tmp_path / "run", every=2, num_samples=4)
    cfg.model.teacher_iters, cfg.model.teacher_batch_size = 10, 32
    cfg.model.teacher_cache = str(tmp_path / "teachers")
    cfg.train.iters, cfg.train.batch_size, cfg.train.ckpt_every, cfg.train.log_every = 4, 4, 4, 0
    run_local(cfg, progress=False)
    names = sorted(os.listdir(tmp_path / "run" / "rollouts"))
    assert names == ["step_00000002", "step_00000004"]
    for name in names:
        assert {"latents.tar", "preview.png", "metrics.json"} <= set(os.listdir(tmp_path / "run" / "rollouts" / name))
