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


def test_a_checkpoint_flush_covers_the_checkpoint_step_logged_after_it(prefix):
    """The loop saves step S's checkpoint before it logs step S: flush(through_step=S) puts what is buffered
    up now and S's record as soon as it arrives, so a crash after the checkpoint never loses S's record."""
    url = storage.join(prefix, "data_keys", "rank_1.jsonl")
    log = RecordLog(url, resume_step=0, flush_steps=100, flush_s=1e9)
    log.append({"step": 1, "keys": ["a"]})
    log.flush(through_step=2)  # checkpoint of step 2
    assert steps_of(url) == [1]
    log.append({"step": 2, "keys": ["b"]})
    assert steps_of(url) == [1, 2]  # on storage before step 3 starts
    log.append({"step": 3, "keys": ["c"]})
    assert steps_of(url) == [1, 2]  # back to the normal cadence
    resumed = RecordLog(url, resume_step=2, flush_steps=100, flush_s=1e9)  # killed during step 3
    resumed.append({"step": 3, "keys": ["c"]})
    resumed.close()
    assert steps_of(url) == [1, 2, 3]
