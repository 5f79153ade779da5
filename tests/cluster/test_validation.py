"""Validation on the teacher group (issue 13): the ValidationServer (TeacherServer replica 0, or its own actor in
shared placement) encodes the validation prompts once and decodes the rollouts' final latents with the family's
VAE; the preview is then a real decoded image grid, and wandb gets one image per sample captioned with its
prompt. Runs the server object in-process (the Ray hop is exercised by tests/cluster/test_train_distributed.py)."""
from __future__ import annotations

import io

import torch
from PIL import Image

from trainer.config import load_config


def _dit_dir(root, cfg) -> str:
    from diffusers import AutoencoderKL

    from models.families import get_family

    get_family("dit").load_network(cfg).save_pretrained(str(root / "transformer"))
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=4, scaling_factor=0.18215).save_pretrained(str(root / "vae"))
    return str(root)


def test_prompts_encoded_once_and_rollouts_decoded_with_captions(tmp_path, monkeypatch):
    from cluster.validation import ValidationServer
    from models.families import get_family
    from models.pipeline import PiFlowStudent
    from trainer.metrics import MetricsLogger
    from trainer.rollouts import RolloutHook, rollout_url

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    base = load_config("configs/dit_imagenet_gm_k32_1nfe_tiny.yaml", ["model.latent_size=4"])
    pretrained = _dit_dir(tmp_path / "dit", base)
    cfg = load_config("configs/dit_imagenet_gm_k32_1nfe_tiny.yaml",
                      ["model.latent_size=4", f"model.pretrained={pretrained}", "model.tiny=false",
                       f"run.output={tmp_path / 'run'}", "eval.num_samples=3", "wandb.mode=offline"])
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
    assert grid.size == (3 * 8, 8)  # 3 samples of 4x4 latents decoded by the x2 VAE, not latent channels
    # the preview is the VAE's decode of the final latents
    x0 = hook.sample()[0][:, -1]
    images = server.decode(x0)
    expected = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, 3, 8, 8)
    got = torch.from_numpy(__import__("numpy").array(grid)).permute(2, 0, 1).reshape(3, 8, 3, 8).permute(2, 0, 1, 3)
    assert (got.int() - expected.int()).abs().max() <= 1
    runs = list(tmp_path.rglob(f"offline-run-*-{run_id}"))
    data = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for prompt in cfg.eval.prompts:  # one wandb image per sample, its prompt as caption
        assert f"{prompt} (seed".encode() in data
