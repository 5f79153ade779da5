"""MetricsLogger: metrics.jsonl records, the console line, wandb offline files."""
from __future__ import annotations

import io
import json
import math

import pytest
import torch

from trainer.config import config_from_dict, load_config
from trainer.metrics import MetricsLogger, read_metrics


def test_jsonl_records_and_console(tmp_path):
    cfg = load_config(None, ["train.log_every=2", "wandb.mode=disabled"])
    out = io.StringIO()
    with MetricsLogger(cfg, tmp_path, stream=out) as logger:
        for step in range(1, 5):
            logger.log(step, {"loss": torch.tensor(1.0 / step), "grad_norm": 0.5, "lr": 1e-3, "bad": math.nan})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert math.isnan(records[0]["bad"])  # a NaN is read back as a float NaN, not hidden as a string
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("step 2 | loss 0.5") and lines[1].startswith("step 4 | loss 0.25")


def test_non_zero_rank_writes_nothing(tmp_path):
    cfg = load_config(None, ["wandb.mode=offline"])
    logger = MetricsLogger(cfg, tmp_path / "r1", rank=1)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "r1").exists()


def test_read_metrics_names_a_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = load_config(None, ["wandb.mode=offline", "run.name=metrics-test"])
    with MetricsLogger(cfg, tmp_path, stream=io.StringIO()) as logger:
        logger.log(1, {"loss": 2.0, "note": "text values stay out of wandb"})
        run_id = logger.wandb_run_id
    assert run_id
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.0


def test_resume_step_drops_records_after_the_checkpoint(tmp_path):
    cfg = config_from_dict({"train": {"log_every": 0}})
    with MetricsLogger(cfg, tmp_path) as logger:
        for step in range(1, 7):
            logger.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a writer killed mid-line
    with MetricsLogger(cfg, tmp_path, resume_step=4) as logger:  # resumed from the checkpoint of step 4
        for step in range(5, 8):
            logger.log(step, {"loss": 10.0 * step})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in records] == [1.0, 2.0, 3.0, 4.0, 50.0, 60.0, 70.0]


def _wandb_records(path):
    """Records of a wandb offline file (`run-<id>.wandb`): a LevelDB-style log (7-byte file header, 32 KiB
    blocks, 7-byte record headers: crc32, length, type FULL/FIRST/MIDDLE/LAST) of protobuf `Record`s."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    out, pos, block, parts = [], 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL / LAST
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
            parts = b""
    return out


def test_wandb_after_resume_rewinds_so_relogged_steps_are_kept(tmp_path, monkeypatch, caplog):
    """issue 12: with resume="allow" wandb drops log(step=s) for s below the run's last step, so the steps a
    resumed run logs again vanished from wandb. The resumed run now starts with resume_from=<id>?_step=N
    (wandb's rewind): the offline files hold the branch point and every re-logged step."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = load_config(None, ["wandb.mode=offline", "run.name=rewind", "train.log_every=0"])
    with MetricsLogger(cfg, tmp_path, stream=io.StringIO()) as logger:
        for step in range(1, 7):
            logger.log(step, {"loss": float(step)})
        run_id = logger.wandb_run_id
    import time

    time.sleep(1.1)  # wandb names offline dirs by the second: keep the two sessions apart
    with MetricsLogger(cfg, tmp_path, stream=io.StringIO(), run_id=run_id, resume_step=4) as logger:
        assert logger.wandb_run_id == run_id  # the same wandb run, not a new one
        for step in range(5, 8):
            logger.log(step, {"loss": 10.0 * step})
    first, second = sorted(p for p in (tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    records = _wandb_records(next(second.glob("*.wandb")))
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
    config = {key(item): json.loads(item.value_json) for item in run.config.update}
    fallback = [r.getMessage() for r in caplog.records if "refused to rewind" in r.getMessage()]
    assert config["_wandb"].get("branch_point") == {"run_id": run_id, "step": 4}, fallback  # says why, if it fell back
    history = [{key(i): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    steps = [r.history.step.num for r in records if r.WhichOneof("record_type") == "history"]
    assert list(zip(steps, [h["loss"] for h in history])) == [(5, 50.0), (6, 60.0), (7, 70.0)]
