"""Validation on the teacher group (issue 13): the ValidationServer (TeacherServer replica 0, or its own actor in
shared placement) encodes the validation prompts once and decodes the rollouts' final latents with the family's
VAE; the preview is then a real decoded image grid, and wandb gets one image per sample captioned with its
prompt. Runs the server object in-process (the Ray hop is exercised by tests/cluster/test_train_distributed.py).

Issue 21: the shared-placement actor has resources of its own (a GPU in GPU runs, counted by the preflight),
uses CUDA only when Ray gave it a GPU, and a lost one is restarted and never fails a training rank."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from tests.recipes import FP32, recipe_config
from trainer.config import load_config


def test_prompts_encoded_once_and_rollouts_decoded_with_captions(tmp_path, monkeypatch):
    from cluster.validation import ValidationServer
    from models.families import get_family
    from models.pipeline import PiFlowStudent
    from trainer.metrics import MetricsLogger
    from trainer.evaluation.rollouts import RolloutHook, rollout_url

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
    from trainer.evaluation.rollouts import RolloutHook, rollout_url

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


# ------------------------------------------------------------------------------------------- issue 21
def _dit_validation_cfg(tmp_path, *extra: str):
    return recipe_config("dit", "eval.num_samples=2", "eval.every=1", "teacher.placement=shared", "lora.enabled=true",
                         "teacher.cpus_per_replica=0", *extra, output=str(tmp_path / "run"))


def test_an_actor_without_a_gpu_never_picks_cuda(tmp_path, monkeypatch, ray_local):
    """Ray gave this process no GPU (the driver of the shared local Ray): even where CUDA is visible, the
    validation server decodes on the CPU instead of beside a student rank."""
    from cluster.validation import ValidationServer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node, as the actor would see it
    assert ValidationServer(_dit_validation_cfg(tmp_path).to_dict()).device == torch.device("cpu")


def test_the_validation_actor_takes_its_own_gpu_in_gpu_runs(tmp_path):
    from cluster.capacity import run_demands
    from cluster.validation import validation_options

    cpu_run = _dit_validation_cfg(tmp_path)
    assert validation_options(cpu_run) == {"num_cpus": 0.0, "num_gpus": 0.0, "max_restarts": 3}
    gpu_run = load_config("configs/dit_imagenet_gm_k32_1nfe.yaml",
                          ["teacher.placement=shared", "lora.enabled=true", "eval.every=1",
                           "teacher.cpus_per_replica=2", "cluster.student.gpus_per_worker=1",
                           "cluster.student.workers=2"])
    assert validation_options(gpu_run) == {"num_cpus": 2.0, "num_gpus": 1.0, "max_restarts": 3}
    demands = {d.what: (d.bundle, d.count) for d in run_demands(gpu_run)}
    assert demands["validation actor"] == ({"CPU": 2.0, "GPU": 1.0}, 1)  # counted by the resource preflight
    cpu_decode = load_config("configs/dit_imagenet_gm_k32_1nfe.yaml",
                             ["teacher.placement=shared", "lora.enabled=true", "eval.every=1",
                              "cluster.student.gpus_per_worker=1", "eval.validation_gpus=0"])
    assert validation_options(cpu_decode)["num_gpus"] == 0.0


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_lost_validation_actor_is_restarted_and_never_fails_a_rank(tmp_path, ray_local, caplog):
    import os
    import signal

    import ray

    from cluster.validation import RemoteValidation, start_validation

    cfg = _dit_validation_cfg(tmp_path)
    v = start_validation(cfg, None)
    assert v["own"]
    client = RemoteValidation(v["actor"], v["prompts"], v["cond"])
    m = cfg.model
    x0 = torch.randn(2, m.latent_channels, m.latent_size, m.latent_size, generator=torch.Generator().manual_seed(0))
    images = client.decode(x0)
    assert images.shape == (2, 3, 8 * m.latent_size, 8 * m.latent_size)
    pid = ray.get(v["actor"].__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)  # the actor's process dies (its node's OOM killer, a crash)
    again = client.decode(x0)  # on the restarted actor, which loads the VAE again
    assert torch.equal(again, images)
    assert ray.get(v["actor"].__ray_call__.remote(lambda self: os.getpid())) != pid
    ray.kill(v["actor"], no_restart=True)  # gone for good
    with caplog.at_level("WARNING", logger="cluster.validation"):
        assert client.decode(x0) is None  # no exception reaches the rank: the preview shows latent channels
    assert "validation actor lost" in caplog.text
