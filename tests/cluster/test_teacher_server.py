"""TeacherServer on the shared local Ray: velocities equal the in-rank (shared placement) teacher, requests
from several ranks are batched into one forward, and prompt embeddings are sent once per batch."""
from __future__ import annotations

import pytest
import torch

from tests.cluster.flux_fixtures import save_tiny_teacher
from tests.trainer.engine_workers import flux_cfg, global_piid_batch
from trainer.config import config_from_dict

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    return save_tiny_teacher(tmp_path_factory.mktemp("flux_teacher"))


@pytest.fixture(scope="module")
def server_group(ray_local, teacher_dir):
    from cluster.orchestrator import start_teacher_group

    cfg = config_from_dict(flux_cfg(1, teacher_dir, placement="separate",
                                    teacher={"cpus_per_replica": 0.0, "batch_wait_ms": 200.0}))
    group = start_teacher_group(cfg)
    yield group
    group.shutdown()


def test_separate_and_shared_placement_give_the_same_velocities(server_group, teacher_dir):
    from cluster.teacher_server import RemoteTeacher
    from models.families import get_family
    from models.teacher import Teacher

    x, cond = global_piid_batch(0, 3)
    sigma = torch.tensor([0.9, 0.5, 0.1])
    remote = RemoteTeacher(server_group.servers)
    u_separate = remote(x, sigma, cond)  # the TeacherServer's own frozen replica
    # shared: the student's LoRA trunk with adapters off (its LoRA B is perturbed so "off" matters)
    cfg = config_from_dict(flux_cfg(1, teacher_dir, placement="shared", train={"engine": "torch"}))
    family = get_family("flux")
    teacher = Teacher(family, cfg, None)
    student = family.build_student(cfg, teacher=teacher, network=family.load_network(cfg))
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    u_shared = teacher(x, sigma, cond)
    u_adapted = student.mean_velocity(x, sigma, cond)  # adapters on: the student, not the teacher
    assert (u_adapted - u_shared).abs().max() > 1e-3
    assert u_separate.shape == x.shape and u_separate.dtype == torch.float32
    torch.testing.assert_close(u_separate, u_shared, rtol=1e-5, atol=1e-6)
    # an independent reference: the plain diffusers network loaded from the same files
    reference = family.build_teacher(config_from_dict(flux_cfg(1, teacher_dir)))
    torch.testing.assert_close(u_separate, reference(x, sigma, cond), rtol=1e-5, atol=1e-6)


def test_concurrent_requests_are_batched_and_cond_crosses_once(server_group):
    import ray

    from cluster.teacher_server import RemoteTeacher

    server = server_group.servers[0]
    before = ray.get(server.stats.remote())
    x, cond = global_piid_batch(1, 2)
    ranks = [RemoteTeacher(server_group.servers, rank=r) for r in range(2)]
    # each "rank" sends 2 queries of 2 states (n_int = 2 rows per cond row), all in flight together
    xa = [torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(r)) for r in range(4)]
    sigma = torch.tensor([0.8, 0.6, 0.4, 0.2])
    futures = [ranks[i % 2].submit(xa[i], sigma, cond) for i in range(4)]
    results = [f.result() for f in futures]
    after = ray.get(server.stats.remote())
    assert after["requests"] - before["requests"] == 4
    assert after["batches"] - before["batches"] < 4  # batched (the 200 ms window holds them together)
    assert after["cond_puts"] - before["cond_puts"] == 2  # once per rank for this batch, not per request
    assert after["queue_len"] == 0 and after["mean_latency_s"] > 0
    # batching does not change the numbers: each result equals a lone request with cond rows repeated
    for i in (0, 3):
        alone = ranks[0](xa[i][:2], sigma[:2], cond)
        torch.testing.assert_close(results[i][:2], alone, rtol=1e-5, atol=1e-6)
