"""Fault tolerance, one real failure each (processes are SIGKILLed by pid, only processes of this test's own
Ray session; nothing is simulated):

- a DataWorker dies: Ray restarts it, it reads again from the lost shard visit; no sample lost or repeated;
- a TeacherServer dies: Ray restarts it (teacher.max_restarts), the in-flight request is retried on the new
  replica and returns the same velocity; training with a dying teacher goes on to the end;
- a student worker dies: Ray Train restarts the group (max_failures) from the newest checkpoint and the run
  ends with the same losses as an uninterrupted run;
- the restart fails (the weights are gone): the run stops with a clear error and the last good checkpoint
  stays valid;
- a deterministic failure (too many non-finite steps, NaN injected into the teacher's answers through
  trainer/fault_injection.py) is not retried: one attempt, a clear error, the last finite checkpoint kept.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.cluster.flux_fixtures import COND_SHAPES, save_tiny_teacher
from tests.data_pipeline.helpers import write_shards
from tests.trainer.engine_workers import flux_cfg
from trainer.config import config_from_dict

pytestmark = [pytest.mark.ray]


def actor_pid(handle) -> int:
    import ray

    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------- DataWorker
@pytest.mark.timeout(240)
def test_a_killed_data_worker_restarts_at_its_cursor(tmp_path, ray_local):
    from cluster.data_worker import DataWorkerPool
    from data_pipeline.stream import PromptStream

    urls = write_shards(str(tmp_path), [5, 7, 3, 6, 4, 5])  # 30 prompts
    ref = PromptStream(urls, 4, seed=5)
    want = [next(ref).keys for _ in range(12)]  # 48 samples: over an epoch boundary
    ref.close()

    pool = DataWorkerPool(urls, 4, seed=5, num_workers=2, prefetch=2)
    try:
        got = [next(pool).keys for _ in range(3)]
        pids = [actor_pid(w) for w in pool.workers]
        kill(pids[0])  # with read-ahead queued on it: those shard visits are lost with the process
        got += [next(pool).keys for _ in range(4)]
        kill(actor_pid(pool.workers[1]))
        got += [next(pool).keys for _ in range(5)]
        new_pids = [actor_pid(w) for w in pool.workers]
        assert new_pids[0] != pids[0] and new_pids[1] != pids[1]  # both were really restarted
        assert got == want  # same samples, same order: nothing lost, nothing repeated
        flat = [k for batch in got for k in batch]
        assert sorted(flat[:30]) == sorted(set(flat[:30])) and len(set(flat[:30])) == 30  # one full epoch
    finally:
        pool.shutdown()


# --------------------------------------------------------------------------------------- TeacherServer
def _teacher_cfg(teacher_dir: str, **teacher):
    return config_from_dict(flux_cfg(1, teacher_dir, placement="separate",
                                     teacher={"cpus_per_replica": 0.0, **teacher}))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("flux_teacher"))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_killed_teacher_is_restarted_and_the_in_flight_request_retried(teacher_dir, ray_local):
    from cluster.orchestrator import start_teacher_group
    from cluster.teacher_server import RemoteTeacher
    from tests.trainer.engine_workers import global_piid_batch

    # a long batching wait keeps the request queued on the replica long enough to kill it mid-request
    cfg = _teacher_cfg(teacher_dir, batch_wait_ms=1500.0, max_restarts=2)
    group = start_teacher_group(cfg)
    try:
        client = RemoteTeacher(group.servers)
        noise, cond = global_piid_batch(0, 3)  # (3,4,8,8), prompt embeddings of 3 prompts
        sigma = torch.tensor([0.9, 0.5, 0.2])
        u_ref = client(noise, sigma, cond)

        pid = actor_pid(group.servers[0])
        future = client.submit(noise, sigma, cond)  # in flight: waiting 1.5 s for company on the replica
        time.sleep(0.3)
        kill(pid)
        u = future.result()  # resent (embeddings first) to the restarted replica
        assert torch.equal(u, u_ref)  # a frozen teacher: the retried velocity is the same

        assert actor_pid(group.servers[0]) != pid
        stats = group.stats()[0]  # the new process's counters: only the retried request
        assert stats["requests"] == 1 and stats["cond_puts"] == 1
        assert torch.equal(client(noise, sigma, cond), u_ref)  # and it keeps serving
    finally:
        group.shutdown()


# ------------------------------------------------------------------------------------ student group runs
RUN_ITERS = 6


def _run_cfg(teacher_dir: str, out: Path, max_failures: int, **train):
    return config_from_dict(flux_cfg(
        2, teacher_dir, placement="separate",
        teacher={"cpus_per_replica": 0.0, "overlap": True, "max_restarts": 2},
        train={"iters": RUN_ITERS, "ckpt_every": 2, "log_every": 1, **train},
        run={"output": str(out), "seed": 11},
        cluster={"student": {"workers": 2, "cpus_per_worker": 1.0, "max_failures": max_failures}}))


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _session_pids(title: str) -> list[int]:
    """Processes of THIS test session's Ray (children of its raylet) whose title starts with `title`."""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for child in psutil.Process(raylet).children(recursive=True):
        try:
            if child.cmdline() and child.cmdline()[0].startswith(title):
                pids.append(child.pid)
        except psutil.Error:
            continue
    return pids


class Killer(threading.Thread):
    """Once `after` (a checkpoint manifest) exists, SIGKILLs one process found by `find`, then one of each
    later generation (processes not yet seen at an earlier kill: a restarted group), `times` times in all.
    Records what it killed; `stop()` ends it."""

    def __init__(self, after: Path, find, times: int = 1, before_kill=None):
        super().__init__(daemon=True)
        self.after, self.find, self.times, self.before_kill = after, find, times, before_kill
        self.killed: list[int] = []
        self._seen: set[int] = set()  # every process alive at an earlier kill (its generation is done for)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set() and len(self.killed) < self.times:
            if self.after.exists():
                current = self.find()
                fresh = [p for p in current if p not in self._seen]
                if fresh:
                    if self.before_kill is not None and not self.killed:
                        self.before_kill()
                    try:
                        kill(fresh[0])
                        self.killed.append(fresh[0])
                        self._seen.update(current)
                    except ProcessLookupError:
                        pass
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


def _train(cfg, killer: "Killer | None" = None):
    from cluster.orchestrator import start_teacher_group
    from cluster.student_group import run_student_group

    group = start_teacher_group(cfg)
    if killer is not None:
        killer.start()
    try:
        return run_student_group(cfg, group.servers, COND_SHAPES, num_threads=1)
    finally:
        if killer is not None:
            killer.stop()
        group.shutdown()


@pytest.fixture(scope="module")
def reference_losses(teacher_dir, ray_local, tmp_path_factory):
    """An uninterrupted run: 2 ranks, a TeacherServer, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("reference")
    _train(_run_cfg(teacher_dir, out, max_failures=0))
    losses = _losses(out)
    assert sorted(losses) == list(range(1, RUN_ITERS + 1))
    return losses


def _manifest(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}" / "MANIFEST.json"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(480)
def test_training_goes_on_while_its_teacher_dies(teacher_dir, reference_losses, tmp_path):
    out = tmp_path / "run"
    cfg = _run_cfg(teacher_dir, out, max_failures=0)  # the student group itself never restarts here
    killer = Killer(_manifest(out, 2), lambda: _session_pids("ray::TeacherServer"))
    summaries = _train(cfg, killer)
    assert len(killer.killed) == 1
    assert [s["steps"] for s in summaries] == [RUN_ITERS, RUN_ITERS]
    assert summaries[0].get("start_step", 0) == 0  # no student restart: the teacher's death was absorbed
    losses = _losses(out)
    assert sorted(losses) == list(range(1, RUN_ITERS + 1))
    for step, loss in reference_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-6), step


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(480)
def test_a_killed_student_worker_resumes_from_the_newest_checkpoint(teacher_dir, reference_losses, tmp_path):
    out = tmp_path / "run"
    cfg = _run_cfg(teacher_dir, out, max_failures=1)
    killer = Killer(_manifest(out, 2), lambda: _session_pids("ray::RayTrainWorker"))
    summaries = _train(cfg, killer)
    assert len(killer.killed) == 1
    assert [s["steps"] for s in summaries] == [RUN_ITERS, RUN_ITERS]
    assert summaries[0]["start_step"] >= 2 and summaries[0]["resumed_from"]  # the restarted group resumed
    losses = _losses(out)
    assert sorted(losses) == list(range(1, RUN_ITERS + 1))  # truncated at the resume point: no step twice
    assert losses[RUN_ITERS] == pytest.approx(reference_losses[RUN_ITERS], rel=1e-6)
    for step, loss in reference_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-6), step


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(480)
def test_when_every_restart_dies_the_run_stops_clearly_and_keeps_its_checkpoint(teacher_dir, ray_local, tmp_path):
    from cluster.student_group import StudentGroupFailed
    from trainer.checkpoint.store import latest_valid, verify

    import shutil

    weights = Path(tmp_path / "teacher")
    shutil.copytree(teacher_dir, weights)  # this run's own copy: it is taken away mid-run
    out = tmp_path / "run"
    cfg = _run_cfg(str(weights), out, max_failures=1)
    # A worker dies after the step-2 checkpoint (infrastructure: the group restarts), and at the same moment the
    # teacher weights every rank builds its student from disappear (a lost mount): the restart fails on the
    # missing weights, a deterministic error, so the run stops at once instead of retrying (issue 21).
    killer = Killer(_manifest(out, 2), lambda: _session_pids("ray::RayTrainWorker"),
                    before_kill=lambda: (weights / "transformer").rename(weights / "gone"))
    with pytest.raises(StudentGroupFailed) as err:
        _train(cfg, killer)
    assert len(killer.killed) == 1
    message = str(err.value)
    assert "cluster.student.max_failures=1" in message and "last good checkpoint" in message
    newest = latest_valid(str(out), verify_mode="sha256")  # every file re-hashed against the manifest
    assert newest is not None and newest.step >= 2 and f"step {newest.step}" in message
    assert verify(newest.url, newest.manifest, "sha256") is None


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(480)
def test_a_deterministic_nonfinite_stop_is_not_retried(teacher_dir, ray_local, tmp_path, monkeypatch):
    from cluster.student_group import StudentGroupFailed
    from trainer.checkpoint.store import latest_valid, list_steps

    out = tmp_path / "run"
    # the teacher answers NaN at steps 3 and 4 of every attempt (keyed by step: a restart would meet them
    # again); two consecutive skips stop the run. The overlapped submit().result() path of a remote teacher.
    monkeypatch.setenv("PIFLOW_INJECT_NAN_TEACHER_STEPS", "3,4")
    cfg = _run_cfg(teacher_dir, out, max_failures=2, max_nonfinite_steps=2)
    with pytest.raises(StudentGroupFailed) as err:
        _train(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert "NonFiniteError: step 4: 2 consecutive steps with non-finite loss and teacher" in message
    assert "not retried" in message and "deterministic" in message
    assert "the last good checkpoint is" in message and "(step 2)" in message
    failures = [json.loads(p.read_text()) for p in sorted((out / "failures").glob("*.json"))]
    assert {f["type"] for f in failures} == {"NonFiniteError"}
    assert len({f["attempt"] for f in failures}) == 1  # one attempt: Ray Train did not restart the group
    assert sorted(f["rank"] for f in failures) == [0, 1]
    assert list_steps(str(out)) == [2]  # nothing written from the skipped steps
    assert latest_valid(str(out), verify_mode="sha256").step == 2
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(losses[s]) for s in (1, 2))
    assert math.isnan(losses[3]) and math.isnan(losses[4])
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    assert {r["step"]: r["nonfinite_skipped"] for r in records} == {1: 0, 2: 0, 3: 1, 4: 2}
