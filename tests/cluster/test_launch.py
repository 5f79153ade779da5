"""launch_training, in-process branch: the toy end to end through the CLI; a multi-worker torch run fails clearly."""
from __future__ import annotations

import pytest

from cluster.cli import build_parser, main
from cluster.launch import launch_training
from tests.trainer.toy_helpers import one_thread, tiny_toy_config, toy_teacher_cache  # noqa: F401 (fixtures)
from trainer.config import ConfigError
from trainer.metrics import read_metrics


def test_piflow_train_in_process_writes_metrics(tmp_path, toy_teacher_cache, one_thread):
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text("model:\n  family: toy2d\n")
    overrides = [f"{k}={v}" for k, v in {
        "model.hidden_dim": 32, "model.num_layers": 2, "model.teacher_iters": 300, "model.teacher_batch_size": 256,
        "model.teacher_lr": 0.005, "model.teacher_cache": toy_teacher_cache, "policy.logstd_inner_dim": 16,
        "distill.nfe": 2, "distill.shift": 1.0, "distill.total_substeps": 8, "train.batch_size": 16,
        "train.iters": 3, "train.ckpt_every": 2, "run.output": tmp_path / "run"}.items()]
    assert main(["train", str(cfg_path), *overrides]) == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    assert (tmp_path / "run" / "config.yaml").exists()


def test_in_process_engine_with_several_workers_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cluster.student.workers"):
        launch_training(tiny_toy_config(tmp_path, "cluster.student.workers=2", "train.batch_size=64"))


def test_help_lists_demo_and_teacher(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "demo" in out and "teacher" in out and "train" in out


def test_train_address_flag_overrides_cluster_address(tmp_path, monkeypatch):
    import cluster.launch

    seen = {}
    monkeypatch.setattr(cluster.launch, "launch_training", lambda cfg, config_path=None: seen.update(cfg=cfg))
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("cluster:\n  address: local\n")
    assert main(["train", str(cfg_path), "--address", "10.0.0.5:6379", "train.iters=3"]) == 0
    assert seen["cfg"].cluster.address == "10.0.0.5:6379" and seen["cfg"].train.iters == 3
    assert main(["train", str(cfg_path)]) == 0
    assert seen["cfg"].cluster.address == "local"
