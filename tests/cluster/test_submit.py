"""`piflow submit|status|stop` through the Ray Jobs API.

Unit part (no cluster): token lookup order, address checks, the submission built from a config (entrypoint,
excludes, env), and the working-dir package Ray builds with our excludes. End-to-end part (`ray`): a real
`ray start --head` on loopback with token auth (tests/cluster/loopback_ray.py); the CLI runs as a
subprocess, as a user would run it, with the token only in its environment."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from cluster.submit import (DEFAULT_EXCLUDES, SubmitError, SubmitRequest, auth_headers, auth_token,
                            build_submission, dashboard_address)
from trainer.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "configs" / "toy2d.yaml"


def toy_overrides(tmp: Path, iters: int) -> list[str]:
    """configs/toy2d.yaml shrunk to seconds; outputs and the teacher cache under `tmp` (absolute paths: the
    job runs in Ray's unpacked copy of the working dir)."""
    return ["model.hidden_dim=32", "model.num_layers=2", "model.teacher_iters=200", "model.teacher_batch_size=128",
            "model.teacher_lr=0.005", f"model.teacher_cache={tmp / 'teachers'}", "policy.logstd_inner_dim=16",
            "distill.nfe=2", "distill.total_substeps=8", "train.batch_size=16", f"train.iters={iters}",
            "train.log_every=1", "train.ckpt_every=1000", "eval.every=0", f"run.output={tmp / 'run'}"]


# ------------------------------------------------------------------------------------------------ unit
def test_token_lookup_follows_rays_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    path = tmp_path / "tok"
    path.write_text("from-path\n")
    assert auth_token({"HOME": str(home), "RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path)}) == "from-env"
    assert auth_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(path)}) == "from-path"
    assert auth_token({"HOME": str(home)}) == "from-home"
    assert auth_token({"HOME": str(home), "RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}) is None
    assert auth_token({"HOME": str(tmp_path)}) is None  # no token anywhere, mode unset: none sent
    assert auth_headers({"HOME": str(tmp_path), "RAY_AUTH_TOKEN": "abc"}) == {"Authorization": "Bearer abc"}
    with pytest.raises(SubmitError, match="RAY_AUTH_MODE=token but no token"):
        auth_token({"HOME": str(tmp_path), "RAY_AUTH_MODE": "token"})
    with pytest.raises(SubmitError, match="cannot read the token file"):
        auth_token({"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_address_must_be_the_dashboard_url():
    assert dashboard_address("http://head:8265/", {}) == "http://head:8265"
    assert dashboard_address(None, {"RAY_ADDRESS": "10.0.0.1:6379", "RAY_API_SERVER_ADDRESS": "http://h:1"}) == "http://h:1"
    with pytest.raises(SubmitError, match="not the GCS address"):
        dashboard_address("head:6379", {})
    with pytest.raises(SubmitError, match="no cluster address"):
        dashboard_address(None, {"RAY_ADDRESS": "auto"})


def test_submission_entrypoint_excludes_and_env(tmp_path):
    req = SubmitRequest(config=str(TOY), overrides=["train.iters=7", "run.output=runs/exp 1"], working_dir=str(ROOT),
                        excludes=["data/"], env={"PIFLOW_S3_ENDPOINT": "http://127.0.0.1:9000"}, job_id="j1", force=True)
    sub = build_submission(req)
    assert sub["entrypoint"] == ("python -m cluster.cli train configs/toy2d.yaml train.iters=7 "
                                 "'run.output=runs/exp 1' cluster.address=auto --force")
    env = sub["runtime_env"]
    assert env["working_dir"] == str(ROOT)
    assert env["excludes"][:len(DEFAULT_EXCLUDES)] == list(DEFAULT_EXCLUDES)
    assert "/runs/exp 1" in env["excludes"] and "data/" in env["excludes"]
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "PIFLOW_S3_ENDPOINT": "http://127.0.0.1:9000"}
    assert sub["submission_id"] == "j1" and sub["metadata"]["run_name"] == "toy2d"
    assert build_submission(SubmitRequest(config=str(TOY), working_dir=str(ROOT)))["submission_id"].startswith("toy2d-")


def test_submission_refuses_secrets_outside_configs_and_bad_keys(tmp_path):
    with pytest.raises(SubmitError, match="AWS_SECRET_ACCESS_KEY, WANDB_API_KEY: credentials are not shipped"):
        build_submission(SubmitRequest(config=str(TOY), working_dir=str(ROOT),
                                       env={"WANDB_API_KEY": "k", "AWS_SECRET_ACCESS_KEY": "s", "OK": "1"}))
    outside = tmp_path / "c.yaml"
    outside.write_text(TOY.read_text())
    with pytest.raises(SubmitError, match="must be inside the working dir"):
        build_submission(SubmitRequest(config=str(outside), working_dir=str(ROOT)))
    with pytest.raises(ConfigError, match="unknown key 'train.iterz'"):
        build_submission(SubmitRequest(config=str(TOY), overrides=["train.iterz=1"], working_dir=str(ROOT)))


def test_the_uploaded_package_leaves_out_venvs_runs_git_and_caches(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    wd = tmp_path / "proj"
    for rel in ["cluster/cli.py", "configs/a.yaml", "README.md", ".venv/lib/big.so", "venv/bin/python",
                ".git/objects/x", "runs/old/metrics.jsonl", "wandb/run-1/log", "cluster/__pycache__/cli.cpython.pyc",
                ".pytest_cache/v", "piflow.egg-info/PKG-INFO", "out/exp/ckpt.bin", "notes/runs/keep.md"]:
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        (wd / rel).write_text("x")
    (wd / "configs" / "a.yaml").write_text("run:\n  output: out/exp\n")
    env = build_submission(SubmitRequest(config=str(wd / "configs" / "a.yaml"), working_dir=str(wd)))["runtime_env"]
    create_package(str(wd), tmp_path / "pkg.zip", include_gitignore=True, excludes=env["excludes"])
    names = sorted(n for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/"))
    # only the code, the config and notes/runs (a nested dir named runs is not the run output)
    assert names == ["README.md", "cluster/cli.py", "configs/a.yaml", "notes/runs/keep.md"]


def test_secrets_in_the_working_dir_are_never_uploaded(tmp_path):
    """Issue 21: a zip of a working dir held .env, a .pem and .aws/credentials. Every file of SECRET_EXCLUDES'
    kinds stays out, at any depth, even when --exclude tries to re-include one with a gitignore negation."""
    from ray._private.runtime_env.packaging import create_package

    wd = tmp_path / "proj"
    code = ["cluster/cli.py", "configs/a.yaml", "README.md", "notes/keys.md", "models/idea.py"]
    secrets_ = [".env", ".env.local", ".envrc", "configs/.env", "server.pem", "deploy/tls.key", ".aws/credentials",
                ".aws/config", ".netrc", ".ssh/id_rsa", "id_ed25519", "id_rsa.pub", ".git-credentials", ".pypirc",
                "certs/client.p12"]
    for rel in code + secrets_:
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        (wd / rel).write_text("x")
    (wd / "configs" / "a.yaml").write_text("run:\n  output: out/exp\n")
    env = build_submission(SubmitRequest(config=str(wd / "configs" / "a.yaml"), working_dir=str(wd),
                                         excludes=["!.env", "!*.pem"]))["runtime_env"]
    create_package(str(wd), tmp_path / "pkg.zip", include_gitignore=True, excludes=env["excludes"])
    names = sorted(n for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/"))
    assert names == sorted(code)
    from cluster.submit import SECRET_EXCLUDES

    assert env["excludes"][-len(SECRET_EXCLUDES):] == list(SECRET_EXCLUDES)  # last: nothing re-includes them


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def head():
    from tests.cluster.loopback_ray import LoopbackCluster

    cluster = LoopbackCluster(num_cpus=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def piflow(head, tmp_path: Path, *args: str, token: str | None = None, timeout: float = 240):
    """Run the CLI as a user would: the token only in RAY_AUTH_TOKEN, a HOME without ~/.ray/auth_token."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"HOME": str(home), "RAY_AUTH_TOKEN": head.token if token is None else token})
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _all(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_submit_streams_logs_and_succeeds(head, tmp_path):
    proc = piflow(head, tmp_path, "submit", str(TOY), "--address", head.dashboard_url, "--working-dir", str(ROOT),
                  "--job-id", "toy-ok", *toy_overrides(tmp_path, iters=3))
    out = _all(proc)
    assert proc.returncode == 0, out
    assert "piflow: submitted job toy-ok" in proc.stdout
    assert "done: 3 steps" in proc.stdout  # the job's own output, streamed while it ran
    assert proc.stdout.rstrip().endswith("piflow: job toy-ok SUCCEEDED")
    assert head.token not in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)

    status = piflow(head, tmp_path, "status", "toy-ok", "--address", head.dashboard_url)
    assert status.returncode == 0 and "job toy-ok: SUCCEEDED" in status.stdout
    assert "cluster.address=auto" in status.stdout  # the entrypoint joins the cluster, never a local Ray
    listing = piflow(head, tmp_path, "status", "--address", head.dashboard_url)
    assert any(line.split()[:2] == ["toy-ok", "SUCCEEDED"] for line in listing.stdout.splitlines())


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_wrong_or_missing_token_is_refused_without_echoing_it(head, tmp_path):
    proc = piflow(head, tmp_path, "status", "--address", head.dashboard_url, token="not-the-token-123")
    assert proc.returncode == 2
    assert "the token sent was rejected" in proc.stderr and "RAY_AUTH_TOKEN" in proc.stderr
    assert "not-the-token-123" not in _all(proc)
    proc = piflow(head, tmp_path, "status", "--address", head.dashboard_url, token="")
    assert proc.returncode == 2 and "no token was sent" in proc.stderr


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stop_ends_a_long_job(head, tmp_path):
    proc = piflow(head, tmp_path, "submit", str(TOY), "--address", head.dashboard_url, "--working-dir", str(ROOT),
                  "--no-wait", "--job-id", "toy-long", *toy_overrides(tmp_path, iters=1_000_000))
    assert proc.returncode == 0, _all(proc)
    assert proc.stdout.strip() == "toy-long"
    deadline = time.monotonic() + 120
    while True:  # until it is really training (the first metrics line), so stop has a live driver to end
        metrics = tmp_path / "run" / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().strip():
            break
        assert time.monotonic() < deadline, _all(piflow(head, tmp_path, "status", "toy-long", "--logs",
                                                        "--address", head.dashboard_url))
        time.sleep(1)
    stop = piflow(head, tmp_path, "stop", "toy-long", "--address", head.dashboard_url)
    assert stop.returncode == 0 and stop.stdout.strip() == "piflow: job toy-long STOPPED", _all(stop)
    status = piflow(head, tmp_path, "status", "toy-long", "--address", head.dashboard_url)
    assert "job toy-long: STOPPED" in status.stdout
    n = len(metrics.read_text().splitlines())
    time.sleep(2)
    assert len(metrics.read_text().splitlines()) == n  # nothing trains any more


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_taken_job_id_is_refused_clearly(head, tmp_path):
    args = ["submit", str(TOY), "--address", head.dashboard_url, "--working-dir", str(ROOT), "--no-wait",
            "--job-id", "toy-twice", *toy_overrides(tmp_path, iters=1)]
    first = piflow(head, tmp_path, *args)
    assert first.returncode == 0, _all(first)
    second = piflow(head, tmp_path, *args)
    assert second.returncode == 2 and "the cluster refused the submission" in second.stderr
    assert "toy-twice" in second.stderr and head.token not in _all(second)
    piflow(head, tmp_path, "stop", "toy-twice", "--address", head.dashboard_url)
