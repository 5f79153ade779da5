"""Driver preflight (issue 11): `piflow train` checks the config, the output URL, a storage round trip, the shard
list, the teacher weights and the resume world size, in that order, BEFORE `--force` deletes anything or Ray
starts; each failure is one line naming the key, the value and the fix. Run through the real CLI in process
(the failures come before any heavy import)."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from cluster.cli import main
from data_pipeline import storage

TOY = ["model.family=toy2d", "train.engine=torch", "train.iters=2"]


def run_cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(["train", *args])
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.fixture
def bucket(s3_server):
    name = f"pre-{uuid.uuid4().hex[:10]}"
    storage.makedirs(f"s3://{name}")
    return name


@pytest.fixture
def config(tmp_path) -> str:
    path = tmp_path / "c.yaml"
    path.write_text("run: {name: pre}\n")
    return str(path)


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("url, hint", [("gs://bucket/run", "'gs:' is not supported"),
                                        ("s3a://bucket/run", "did you mean s3://"),
                                        ("s3:/bucket/run", "did you mean s3://"),
                                        ("s3://B_/run", "not a valid S3 bucket name")])
def test_unknown_output_scheme_is_one_line_and_creates_nothing(capsys, config, tmp_path, monkeypatch, url, hint):
    monkeypatch.chdir(tmp_path)
    rc, err = run_cli(capsys, config, *TOY, f"run.output={url}", "--force")
    line = one_line(err)
    assert rc == 2 and "run.output=" in line and url in line and hint in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # never a ./gs: directory


def test_unreachable_storage_fails_the_round_trip(capsys, config, monkeypatch):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setattr("data_pipeline.storage.RETRY_ATTEMPTS", 1)
    rc, err = run_cli(capsys, config, *TOY, "run.output=s3://nobucket/run")
    line = one_line(err)
    assert rc == 2 and "run.output='s3://nobucket/run': the storage round trip failed" in line
    assert "AWS_ENDPOINT_URL" in line and "very-secret-value" not in err


def seed_previous_run(out: str) -> list[str]:
    """A previous run on `out` (a checkpoint written by 2 ranks, metrics): what --force would delete."""
    manifest = {"format": 1, "step": 2, "world_size": 2, "files": {}, "meta": {}}
    storage.put_bytes(storage.join(out, "checkpoints", "step_00000002", "MANIFEST.json"), json.dumps(manifest).encode())
    storage.put_bytes(storage.join(out, "metrics.jsonl", "00000000.jsonl"), b'{"step": 1, "loss": 1.0}\n')
    fs = storage.filesystem(out)
    return sorted(fs.find(out[len("s3://"):]))


def test_missing_shards_fail_before_force_deletes_anything(capsys, config, bucket):
    out = f"s3://{bucket}/runs/a"
    before = seed_previous_run(out)
    storage.put_bytes(f"s3://{bucket}/shards/shard-000000.tar", b"")
    storage.put_bytes(f"s3://{bucket}/shards/shard-000001.tar", b"")
    pattern = f"s3://{bucket}/shards/shard-{{000000..000003}}.tar"
    rc, err = run_cli(capsys, config, *TOY, f"run.output={out}", f"data.shards={pattern}", "--force")
    line = one_line(err)
    assert rc == 2 and "data.shards=" in line and "2 of 4 shards do not exist" in line
    assert f"s3://{bucket}/shards/shard-000002.tar" in line
    assert sorted(storage.filesystem(out).find(out[len("s3://"):])) == before  # nothing deleted


def test_output_check_comes_before_the_shard_check(capsys, config):
    rc, err = run_cli(capsys, config, *TOY, "run.output=gs://x/run", "data.shards=/nonexistent/{0..3}.tar")
    assert rc == 2 and "run.output=" in one_line(err)


def test_teacher_dir_without_config_is_named(capsys, config, tmp_path):
    teacher = tmp_path / "teacher"
    (teacher / "transformer").mkdir(parents=True)
    rc, err = run_cli(capsys, config, "model.family=flux", "train.engine=deepspeed", f"model.pretrained={teacher}",
                      f"run.output={tmp_path / 'out'}")
    line = one_line(err)
    assert rc == 2 and f"model.pretrained='{teacher}'" in line
    assert str(teacher / "transformer" / "config.json") in line and "does not exist" in line


def test_missing_hub_id_names_the_id_and_the_cache(capsys, config, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    rc, err = run_cli(capsys, config, "model.family=flux", "train.engine=deepspeed",
                      "model.pretrained=piflow-test/no-such-model", f"run.output={tmp_path / 'out'}")
    line = one_line(err)
    assert rc == 2 and "model.pretrained='piflow-test/no-such-model'" in line
    assert str(tmp_path / "hf" / "hub") in line and "HF_HUB_OFFLINE" in line


def test_resume_on_another_world_size_passes_preflight(config, bucket):
    """Checkpoints reshard on load (trainer/checkpoint/store.py, tests/trainer/checkpoint/test_reshard.py): a 2-rank checkpoint
    resumed on 1 rank is no longer refused before the run starts."""
    from cluster.preflight import preflight
    from trainer.config import load_config

    out = f"s3://{bucket}/runs/w"
    seed_previous_run(out)  # a checkpoint of 2 ranks
    cfg = load_config(config, [*TOY, f"run.output={out}", "cluster.student.workers=1"])
    preflight(cfg)  # no PreflightError


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no ~/.netrc
    return home


def test_wandb_online_without_credentials_stops_before_anything_loads(no_wandb_credentials, config, tmp_path):
    """Issue 21: a node without W&B credentials failed after loading the model, three times."""
    from cluster.preflight import PreflightError, preflight
    from trainer.config import load_config

    cfg = load_config(config, [*TOY, "wandb.mode=online", f"run.output={tmp_path / 'out'}"])
    with pytest.raises(PreflightError) as err:
        preflight(cfg)
    assert "wandb.mode=online but this node has no W&B credentials for https://api.wandb.ai" in str(err.value)
    assert "WANDB_API_KEY" in str(err.value) and "wandb.mode=offline" in str(err.value)
    preflight(load_config(config, [*TOY, "wandb.mode=offline", f"run.output={tmp_path / 'out'}"]))  # no check


def test_wandb_credentials_from_netrc_or_environment_pass_and_a_bad_key_is_named_not_shown(
        no_wandb_credentials, config, tmp_path, monkeypatch, capsys):
    from cluster.preflight import preflight
    from trainer.config import load_config

    cfg = load_config(config, [*TOY, "wandb.mode=online", f"run.output={tmp_path / 'out'}"])
    netrc = no_wandb_credentials / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "a1" * 20 + "\n")
    netrc.chmod(0o600)
    preflight(cfg)  # a well-formed key in ~/.netrc, as `wandb login` writes it
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "b2" * 20)
    preflight(cfg)
    monkeypatch.setenv("WANDB_API_KEY", "secret-but-short")
    rc, err = run_cli(capsys, config, *TOY, "wandb.mode=online", f"run.output={tmp_path / 'out'}")
    line = one_line(err)
    assert rc == 2 and "wandb.mode=online: WANDB_API_KEY is not a W&B API key" in line
    assert "secret-but-short" not in err and "but-short" not in line
