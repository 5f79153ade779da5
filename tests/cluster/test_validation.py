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


# ------------------------------------------------------------------------------------------- issue 21
def _dit_validation_cfg(tmp_path, *extra: str):
    base = load_config("configs/dit_imagenet_gm_k32_1nfe_tiny.yaml", ["model.latent_size=4"])
    pretrained = _dit_dir(tmp_path / "dit", base)
    return load_config("configs/dit_imagenet_gm_k32_1nfe_tiny.yaml",
                       ["model.latent_size=4", f"model.pretrained={pretrained}", "model.tiny=false",
                        f"run.output={tmp_path / 'run'}", "eval.num_samples=2", "eval.every=1",
                        "teacher.placement=shared", "lora.enabled=true", "teacher.cpus_per_replica=0", *extra])


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
    gpu_run = load_config("configs/dit_imagenet_gm_k32_1nfe_tiny.yaml",
                          ["teacher.placement=shared", "lora.enabled=true", "eval.every=1",
                           "teacher.cpus_per_replica=2", "cluster.student.gpus_per_worker=1",
                           "cluster.student.workers=2"])
    assert validation_options(gpu_run) == {"num_cpus": 2.0, "num_gpus": 1.0, "max_restarts": 3}
    demands = {d.what: (d.bundle, d.count) for d in run_demands(gpu_run)}
    assert demands["validation actor"] == ({"CPU": 2.0, "GPU": 1.0}, 1)  # counted by the resource preflight
    cpu_decode = load_config("configs/dit_imagenet_gm_k32_1nfe_tiny.yaml",
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
    x0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    images = client.decode(x0)
    assert images.shape == (2, 3, 8, 8)
    pid = ray.get(v["actor"].__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)  # the actor's process dies (its node's OOM killer, a crash)
    again = client.decode(x0)  # on the restarted actor, which loads the VAE again
    assert torch.equal(again, images)
    assert ray.get(v["actor"].__ray_call__.remote(lambda self: os.getpid())) != pid
    ray.kill(v["actor"], no_restart=True)  # gone for good
    with caplog.at_level("WARNING", logger="cluster.validation"):
        assert client.decode(x0) is None  # no exception reaches the rank: the preview shows latent channels
    assert "validation actor lost" in caplog.text
