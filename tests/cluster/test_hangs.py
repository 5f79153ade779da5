"""Hung actors (issue 12): a process that stops answering (SIGSTOP: alive, holding its resources, silent, as a
wedged GPU or a stuck read looks from outside) is restarted after its timeout and the request is retried,
instead of hanging every rank forever:

- a TeacherServer replica: `teacher.timeout_s`, the request is resent to the restarted replica and returns
  the same velocity;
- a DataWorker: `data.timeout_s` on a shard visit, the restarted worker reads from the lost visit on and the
  stream is unchanged.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch

from tests.cluster.test_fault_tolerance import _teacher_cfg, actor_pid, teacher_dir  # noqa: F401 - fixture
from tests.data_pipeline.helpers import write_shards

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(300)]


def test_a_hung_teacher_replica_is_restarted_and_the_request_retried(teacher_dir, ray_local):  # noqa: F811
    from cluster.orchestrator import start_teacher_group
    from cluster.teacher_server import RemoteTeacher
    from tests.trainer.engine_workers import global_piid_batch

    cfg = _teacher_cfg(teacher_dir, max_restarts=2, timeout_s=5.0)
    group = start_teacher_group(cfg)
    try:
        client = RemoteTeacher(group.servers, timeout_s=cfg.teacher.timeout_s)
        noise, cond = global_piid_batch(0, 3)
        sigma = torch.tensor([0.9, 0.5, 0.2])
        u_ref = client(noise, sigma, cond)
        pid = actor_pid(group.servers[0])
        os.kill(pid, signal.SIGSTOP)  # hangs: no answer, no death Ray could notice
        try:
            u = client(noise, sigma, cond)
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert torch.equal(u, u_ref)
        assert actor_pid(group.servers[0]) != pid  # it was really restarted
    finally:
        group.shutdown()


def test_a_hung_data_worker_is_restarted_at_its_visit(tmp_path, ray_local):
    from cluster.data_worker import DataWorkerPool
    from data_pipeline.stream import PromptStream

    urls = write_shards(str(tmp_path), [5, 7, 3, 6, 4, 5])
    ref = PromptStream(urls, 4, seed=5)
    want = [next(ref).keys for _ in range(8)]
    ref.close()
    pool = DataWorkerPool(urls, 4, seed=5, num_workers=2, prefetch=1, max_restarts=2, timeout_s=5.0)
    try:
        got = [next(pool).keys for _ in range(2)]
        pid = actor_pid(pool.workers[1])
        os.kill(pid, signal.SIGSTOP)
        try:
            got += [next(pool).keys for _ in range(6)]
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert got == want
        assert actor_pid(pool.workers[1]) != pid
    finally:
        pool.shutdown()
