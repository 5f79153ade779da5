"""Appending logs on object storage (issue 11): metrics.jsonl and data_keys as numbered segments on the moto S3
server, flushed every N steps / T seconds / at a checkpoint, read back as one stream by `read_metrics`, and a
resumed run continuing the stream with the steps after its checkpoint superseded (each step exactly once)."""
from __future__ import annotations

import json
import uuid

import pytest

from data_pipeline import storage
from trainer.config import config_from_dict
from trainer.metrics import MetricsLogger, read_metrics
from trainer.record_log import RecordLog, segments
from tests.trainer.toy_helpers import one_thread, toy_teacher_cache  # noqa: F401 (fixtures)


@pytest.fixture
def prefix(s3_server):
    bucket = f"log-{uuid.uuid4().hex[:10]}"
    storage.makedirs(f"s3://{bucket}")
    return f"s3://{bucket}/run"


def steps_of(url):
    return [r["step"] for r in read_metrics(url)]


def test_segments_flush_every_n_steps_and_at_close(prefix):
    url = storage.join(prefix, "metrics.jsonl")
    log = RecordLog(url, resume_step=0, flush_steps=3, flush_s=1e9)
    for step in (1, 2):
        log.append({"step": step, "loss": float(step)})
    assert segments(url) == []  # nothing is PUT before 3 steps are buffered
    log.append({"step": 3, "loss": 3.0})
    assert [n for n, _ in segments(url)] == [0]
    log.append({"step": 4, "loss": 4.0})
    log.close()  # the rest goes up as the next segment
    assert [n for n, _ in segments(url)] == [0, 1]
    assert read_metrics(url) == [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)]
    body = storage.get_bytes(storage.join(url, "00000000.jsonl")).decode()
    assert [json.loads(line)["step"] for line in body.splitlines()] == [1, 2, 3]


def test_segments_flush_after_t_seconds(prefix):
    url = storage.join(prefix, "keys.jsonl")
    now = [0.0]
    log = RecordLog(url, resume_step=0, flush_steps=1000, flush_s=10.0, clock=lambda: now[0])
    log.append({"step": 1})
    now[0] = 9.0
    log.append({"step": 2})
    assert segments(url) == []
    now[0] = 10.5
    log.append({"step": 3})  # 10.5 s since the last flush: this append flushes all three
    assert steps_of(url) == [1, 2, 3]


def test_resume_continues_the_stream_and_supersedes_later_steps(prefix):
    url = storage.join(prefix, "metrics.jsonl")
    log = RecordLog(url, resume_step=0, flush_steps=2, flush_s=1e9)
    for step in range(1, 8):  # a run that got to step 7, checkpointed at 4, then died
        log.append({"step": step, "loss": 1.0})
    log.flush()
    resumed = RecordLog(url, resume_step=4, flush_steps=2, flush_s=1e9)
    for step in range(5, 9):
        resumed.append({"step": step, "loss": 2.0})
    resumed.close()
    records = read_metrics(url)
    assert [r["step"] for r in records] == list(range(1, 9))  # every step once, in order
    assert [r["loss"] for r in records] == [1.0] * 4 + [2.0] * 4  # 5..7 are the resumed run's
    names = [n for n, _ in segments(url)]
    assert names == sorted(names) and len(names) == len(set(names))


def test_reader_supersedes_a_timeline_that_restarts(prefix):
    """A crash between a resume and its cleanup leaves a segment with steps after the checkpoint: the later
    timeline wins when read."""
    url = storage.join(prefix, "metrics.jsonl")
    storage.put_bytes(storage.join(url, "00000000.jsonl"), b'{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    storage.put_bytes(storage.join(url, "00000001.jsonl"), b'{"step": 2, "x": 1}\n{"step": 3, "x": 1}\n')
    assert read_metrics(url) == [{"step": 1}, {"step": 2, "x": 1}, {"step": 3, "x": 1}]


def test_metrics_logger_writes_to_s3_and_wandb_files_to_scratch(prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    cfg = config_from_dict({"run": {"output": prefix, "scratch": str(tmp_path / "scratch"), "log_flush_steps": 2},
                            "train": {"log_every": 0}, "wandb": {"mode": "offline"}})
    with MetricsLogger(cfg, prefix) as logger:
        for step in range(1, 4):
            logger.log(step, {"loss": 0.5 * step})
        run_id = logger.wandb_run_id
    assert steps_of(storage.join(prefix, "metrics.jsonl")) == [1, 2, 3]
    assert json.loads(storage.get_bytes(storage.join(prefix, "wandb.json")))["id"] == run_id
    assert list((tmp_path / "scratch").rglob(f"offline-run-*-{run_id}"))  # node-local, not on run.output
    assert not any("offline-run" in p for p in storage.filesystem(prefix).find(prefix[len("s3://"):]))


def test_read_metrics_names_a_bad_segment_line(prefix):
    url = storage.join(prefix, "metrics.jsonl")
    storage.put_bytes(storage.join(url, "00000000.jsonl"), b'{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"00000000.jsonl:2"):
        read_metrics(url)


def test_a_checkpoint_commits_only_after_its_steps_record_is_on_storage(prefix, tmp_path, monkeypatch,
                                                                       toy_teacher_cache, one_thread):
    """The 300-step chaos soak lost step 40's record: the loop checkpointed step S before logging it, S's
    segment was PUT after the (async) checkpoint committed, and the driver was killed in between; the resume
    from S then never logged S again. Now every record up to S is on storage when S's checkpoint is saved."""
    import trainer.checkpoint.resume as resume
    from tests.trainer.toy_helpers import tiny_toy_config
    from trainer.local_run import run_local

    output = storage.join(prefix, "ckpt-order")
    cfg = tiny_toy_config(tmp_path, "train.iters=6", "train.ckpt_every=3", f"run.output={output}",
                          "run.log_flush_steps=100", teacher_cache=toy_teacher_cache)
    on_storage_at_save = {}
    save_state = resume.save_state

    def spying_save_state(cfg, manager, step, *args, **kwargs):
        on_storage_at_save[step] = steps_of(storage.join(output, "metrics.jsonl"))
        return save_state(cfg, manager, step, *args, **kwargs)

    monkeypatch.setattr(resume, "save_state", spying_save_state)
    run_local(cfg, progress=False)
    assert on_storage_at_save == {3: [1, 2, 3], 6: [1, 2, 3, 4, 5, 6]}
    records = read_metrics(storage.join(output, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert "checkpoint_stall_s" in records[3] and records[3]["checkpoint_stall_s"] >= 0.0  # step 3's, with 4
