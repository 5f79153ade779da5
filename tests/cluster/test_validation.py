"""Validation on the teacher group (issue 13): the ValidationServer (TeacherServer replica 0, or its own actor in
shared placement) encodes the validation prompts once and decodes the rollouts' final latents with the family's
VAE; the preview is then a real decoded image grid, and wandb gets one image per sample captioned with its
prompt. Runs the server object in-process (the Ray hop is exercised by tests/cluster/test_train_distributed.py)."""
from __future__ import annotations

import io

import torch
from PIL import Image

from tests.recipes import FP32, recipe_config


def test_prompts_encoded_once_and_rollouts_decoded_with_captions(tmp_path, monkeypatch):
    from cluster.validation import ValidationServer
    from models.families import get_family
    from models.pipeline import PiFlowStudent
    from trainer.metrics import MetricsLogger
    from trainer.rollouts import RolloutHook, rollout_url

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    # the ImageNet recipe: its tiny model's DiT and its 8x SD-VAE-shaped VAE
    cfg = recipe_config("dit", *FP32, "eval.num_samples=3", "wandb.mode=offline", output=str(tmp_path / "run"))
    P = 8 * cfg.model.latent_size  # decoded image size
    server = ValidationServer(cfg.to_dict())
    student = PiFlowStudent(piflow=cfg.to_dict(), kind="full").student
    with MetricsLogger(cfg, tmp_path / "run", rank=0) as logger:
        hook = RolloutHook(cfg, get_family("dit"), student, logger=logger, encode=server.encode,
                           decode=server.decode)
        hook(step=1)
        hook(step=2)
        run_id = logger.wandb_run_id
    assert server.validation_calls() == {"encode": 1, "decode": 2}  # encoded once, decoded per validation
    from data_pipeline import storage

    png = storage.get_bytes(storage.join(rollout_url(cfg.run.output, 2), "preview.png"))
    grid = Image.open(io.BytesIO(png))
    assert grid.size == (3 * P, P)  # 3 samples of 8x8 latents decoded by the x8 VAE, not latent channels
    # the preview is the VAE's decode of the final latents
    x0 = hook.sample()[0][:, -1]
    images = server.decode(x0)
    expected = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, 3, P, P)
    got = torch.from_numpy(__import__("numpy").array(grid)).permute(2, 0, 1).reshape(3, P, 3, P).permute(2, 0, 1, 3)
    assert (got.int() - expected.int()).abs().max() <= 1
    runs = list(tmp_path.rglob(f"offline-run-*-{run_id}"))
    data = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for prompt in cfg.eval.prompts[:cfg.eval.num_samples]:  # one wandb image per sample, its prompt as caption
        assert f"{prompt} (seed".encode() in data


def test_video_rollouts_are_decoded_to_clips_and_previewed(tmp_path):
    """The Wan recipe's validation (shared placement: the ValidationServer actor's object here): its VAE decodes
    the folded latents into clips, the preview shows each clip's middle frame (it failed: decode without the
    config, which a video family needs for the frame count)."""
    from cluster.validation import ValidationServer
    from models.families import get_family
    from models.pipeline import PiFlowStudent
    from trainer.rollouts import RolloutHook, rollout_url

    cfg = recipe_config("wan", *FP32, "eval.num_samples=2", output=str(tmp_path / "run"))
    server = ValidationServer(cfg.to_dict())
    student = PiFlowStudent(piflow=cfg.to_dict(), kind="lora").student
    hook = RolloutHook(cfg, get_family("wan"), student, encode=server.encode, decode=server.decode)
    hook(step=1)
    hook.close()
    x0 = hook.sample()[0][:, -1]
    clips = server.decode(x0)
    m = cfg.model
    assert clips.shape == (2, 3, 4 * (m.latent_frames - 1) + 1, 8 * m.latent_size, 8 * m.latent_width)
    from data_pipeline import storage

    grid = Image.open(io.BytesIO(storage.get_bytes(storage.join(rollout_url(cfg.run.output, 1), "preview.png"))))
    assert grid.size == (2 * 8 * m.latent_width, 8 * m.latent_size)
    middle = ((clips[:, :, clips.shape[2] // 2].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    got = torch.from_numpy(__import__("numpy").array(grid)).permute(2, 0, 1)  # (3, H, 2W)
    assert (got[:, :, : 8 * m.latent_width].int() - middle[0].int()).abs().max() <= 1
