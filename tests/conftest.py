"""Shared fixtures and tiering. Markers: slow, distributed, ray, gpu (gpu tests skip without CUDA)."""
from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    # 2-core CI machines: intra-op threads oversubscribe when tests, Ray workers and gloo ranks share cores.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `keywords`: a checkout dir named gpu matches it
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    # Tests never reach the network; those that check wandb files set WANDB_MODE=offline themselves.
    monkeypatch.setenv("WANDB_MODE", os.environ.get("PIFLOW_TEST_WANDB_MODE", "disabled"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto) on loopback for the whole session; yields its endpoint URL.

    Sets AWS_ENDPOINT_URL and fake credentials in the environment for the session (moto accepts any), so
    `data_pipeline.storage` reaches it like a real bucket. Request it BEFORE `ray_local` in a test's
    arguments when Ray workers must see the endpoint (workers inherit the environment at ray.init).
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(scope="session")
def ray_local():
    """One in-process Ray instance shared by every `ray` test of the session (each start costs 5-7 s)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
