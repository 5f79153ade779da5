"""Tiny toy2d configs shared by the trainer tests (small nets, few substeps: seconds on one core)."""
from __future__ import annotations

import pytest
import torch

from trainer.config import load_config


@pytest.fixture(scope="session")
def toy_teacher_cache(tmp_path_factory):
    """One teacher cache per session: the tiny teacher trains once (a second or two), later tests load it."""
    return tmp_path_factory.mktemp("toy_teachers")


@pytest.fixture
def one_thread():
    """Tiny ops run fastest on one thread; more threads spin against each other on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_toy_config(tmp_path, *overrides: str, teacher_cache=None):
    cache = teacher_cache if teacher_cache is not None else tmp_path / "teachers"
    return load_config(None, [
        "model.family=toy2d", "model.hidden_dim=32", "model.num_layers=2", "model.teacher_iters=300",
        "model.teacher_batch_size=256", "model.teacher_lr=0.005", f"model.teacher_cache={cache}",
        "policy.logstd_inner_dim=16", "policy.dropout=0.05", "distill.nfe=2", "distill.final_step_scale=1.0",
        "distill.shift=1.0", "distill.total_substeps=16", "distill.num_intermediate=2", "distill.window_substeps=0",
        "distill.loss_scale=3.0", "optim.lr=0.005", "optim.warmup_iters=5", "optim.grad_clip_start=5",
        "ema.start=5", "train.batch_size=64", "train.iters=40", "train.log_every=0", "wandb.mode=disabled",
        f"run.output={tmp_path / 'run'}", *overrides,
    ])
