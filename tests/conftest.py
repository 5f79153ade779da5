"""Shared fixtures and tiering. Markers: slow, distributed, ray, gpu (gpu tests skip without CUDA)."""
from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    # Tests never reach the network; those that check wandb files set WANDB_MODE=offline themselves.
    monkeypatch.setenv("WANDB_MODE", os.environ.get("PIFLOW_TEST_WANDB_MODE", "disabled"))
    monkeypatch.setenv("WANDB_SILENT", "true")
