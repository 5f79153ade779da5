"""Checkpoint manager: manifest-last layout, exact state round trip, retention, bounded upload queue, failed
and killed uploads, resume rules, and S3 on loopback with injected transient faults."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import storage
from trainer.checkpoint import store as ckpt
from trainer.checkpoint.store import CheckpointError, CheckpointManager, latest_valid, retained_steps
from trainer.config import config_from_dict
from trainer.ema import PowerEMA
from trainer.torch_engine import TorchEngine
from trainer.checkpoint.resume import ResumeError, prepare_output, resume_state, save_state

ROOT = Path(__file__).resolve().parents[3]


def make_cfg(output, **train):
    return config_from_dict({"run": {"output": str(output)}, "optim": {"warmup_iters": 2},
                             "ema": {"start": 0}, "train": {"ckpt_keep_last": 2, **train}})


def make_state(cfg, seed=0):
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    engine = TorchEngine(cfg, module)
    ema = PowerEMA(module.parameters(), gamma=7.0, start=0)
    return module, engine, ema


def train_steps(module, engine, ema, n, gen):
    losses = []
    for _ in range(n):
        x = torch.randn(5, 3, generator=gen)
        loss = module(x).pow(2).mean() + 0.01 * torch.randn(()).item()  # global RNG used too
        engine.backward(loss)
        engine.step()
        ema.update(engine.global_step - 1)
        losses.append(loss.item())
    return losses


def flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


# ------------------------------------------------------------------------------------ round trip, manifest
def test_save_load_round_trip_restores_weights_optimizer_ema_and_rngs(tmp_path):
    cfg = make_cfg(tmp_path / "run")
    module, engine, ema = make_state(cfg)
    gen = torch.Generator().manual_seed(5)
    train_steps(module, engine, ema, 3, gen)
    manager = CheckpointManager(cfg.run.output, keep_last=2)
    random.seed(11)
    np.random.seed(12)
    stall = save_state(cfg, manager, 3, engine, ema, module, data_state={"cursor": [1, 2, 3]},
                       generators={"noise": gen}, wandb_run_id="abc123")
    assert stall >= 0.0
    manager.close()
    # the continuation of the uninterrupted run
    expected_draws = (random.random(), np.random.rand(), torch.rand(()).item())
    expected_losses = train_steps(module, engine, ema, 3, gen)

    info = latest_valid(cfg.run.output, "sha256")
    assert info is not None and info.step == 3 and info.url.endswith("step_00000003")
    manifest = json.loads((Path(info.url) / "MANIFEST.json").read_text())
    on_disk = sorted(str(p.relative_to(info.url)).replace(os.sep, "/") for p in Path(info.url).rglob("*")
                     if p.is_file() and p.name != "MANIFEST.json" and "parts" not in p.parts)
    assert sorted(manifest["files"]) == on_disk
    for rel, meta in manifest["files"].items():
        assert meta["size"] == (Path(info.url) / rel).stat().st_size
        assert meta["sha256"] == ckpt.sha256_file(str(Path(info.url) / rel))
    assert manifest["meta"]["config_hash"] == cfg.hash() and manifest["meta"]["wandb_run_id"] == "abc123"

    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # scramble: the resume must restore them
    module2, engine2, ema2 = make_state(cfg, seed=99)
    gen2 = torch.Generator().manual_seed(0)
    state = resume_state(cfg, CheckpointManager(cfg.run.output), prepare_output(cfg), engine2, ema2, module2,
                         {"noise": gen2})
    assert state.step == 3 and state.data_state == {"cursor": [1, 2, 3]} and state.wandb_run_id == "abc123"
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected_draws
    assert train_steps(module2, engine2, ema2, 3, gen2) == expected_losses
    assert torch.equal(flat(module2), flat(module))
    assert all(torch.equal(a, b) for a, b in zip(ema2.shadow, ema.shadow))


def test_retention_keeps_last_n_plus_every_mth(tmp_path):
    assert retained_steps([1, 2, 3, 4, 5, 6, 7], keep_last=2, keep_every=3) == {3, 6, 7}
    assert retained_steps([10, 20, 30], keep_last=1, keep_every=0) == {30}
    cfg = make_cfg(tmp_path / "run")
    module, engine, ema = make_state(cfg)
    manager = CheckpointManager(cfg.run.output, keep_last=2, keep_every=3, queue_size=1)
    for step in range(1, 8):
        manager.save(step, engine, ema, {"data": None}, module=module)
    manager.close()
    assert ckpt.list_steps(cfg.run.output) == [3, 6, 7]
    assert all((Path(cfg.run.output) / "checkpoints" / ckpt.step_dirname(s) / "MANIFEST.json").exists()
               for s in (3, 6, 7))


# ------------------------------------------------------------------------------------ invalid checkpoints
def test_latest_valid_skips_partial_truncated_and_tampered(tmp_path):
    cfg = make_cfg(tmp_path / "run")
    module, engine, ema = make_state(cfg)
    manager = CheckpointManager(cfg.run.output, keep_last=10)
    for step in (1, 2, 3, 4):
        manager.save(step, engine, ema, {}, module=module)
    manager.close()
    root = Path(cfg.run.output) / "checkpoints"
    (root / "step_00000004" / "MANIFEST.json").unlink()  # partial: no manifest
    with open(root / "step_00000003" / "rank_00000" / "state.safetensors", "ab") as f:  # extended: size differs
        f.write(b"x")
    target = root / "step_00000002" / "rank_00000" / "client.pt"  # same size, different content
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    assert latest_valid(cfg.run.output, "size").step == 2
    assert latest_valid(cfg.run.output, "sha256").step == 1
    # each rank re-checks the checksums of what it downloads
    with pytest.raises(CheckpointError, match="client.pt: content does not match"):
        CheckpointManager(cfg.run.output).load(latest_valid(cfg.run.output, "size"), engine, ema)


def test_prepare_output_cleans_partial_and_requires_force_on_used_output(tmp_path):
    cfg = make_cfg(tmp_path / "run")
    module, engine, ema = make_state(cfg)
    manager = CheckpointManager(cfg.run.output, keep_last=10)
    for step in (1, 2):
        manager.save(step, engine, ema, {}, module=module)
    manager.close()
    root = Path(cfg.run.output) / "checkpoints"
    (root / "step_00000002" / "MANIFEST.json").unlink()
    assert prepare_output(cfg).step == 1
    assert ckpt.list_steps(cfg.run.output) == [1]  # the partial one is gone

    (root / "step_00000001" / "MANIFEST.json").unlink()  # now nothing is valid, but the output is used
    with pytest.raises(ResumeError, match="--force"):
        prepare_output(cfg)
    forced = make_cfg(tmp_path / "run")
    forced.run.force = True
    assert prepare_output(forced) is None
    assert not root.exists()
    assert prepare_output(make_cfg(tmp_path / "fresh")) is None  # an unused output starts fresh


def test_prepare_output_decided_by_the_launcher_never_wipes_or_refuses(tmp_path):
    """Ranks restarted by Ray Train call prepare_output(decided=True): the launcher already applied --force once,
    so a restart resumes from the newest valid checkpoint (never deleting it) and a restart before the first
    checkpoint starts over instead of asking for --force."""
    cfg = make_cfg(tmp_path / "run")
    cfg.run.force = True
    module, engine, ema = make_state(cfg)
    manager = CheckpointManager(cfg.run.output)
    manager.save(1, engine, ema, {}, module=module)
    manager.close()
    assert prepare_output(cfg, decided=True).step == 1
    assert ckpt.list_steps(cfg.run.output) == [1]

    early = make_cfg(tmp_path / "early")
    Path(early.run.output).mkdir(parents=True)
    (Path(early.run.output) / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ResumeError, match="--force"):
        prepare_output(early)  # a user restarting a crashed run must choose
    assert prepare_output(early, decided=True) is None  # a restarted group starts over


def test_resume_warns_on_changed_config(tmp_path, caplog):
    cfg = make_cfg(tmp_path / "run")
    module, engine, ema = make_state(cfg)
    manager = CheckpointManager(cfg.run.output)
    save_state(cfg, manager, 1, engine, ema, module)
    manager.close()
    changed = make_cfg(tmp_path / "run", iters=7)
    with caplog.at_level("WARNING"):
        resume_state(changed, CheckpointManager(cfg.run.output), prepare_output(changed), engine, ema, module)
    assert "train.iters" in caplog.text and "changed config" in caplog.text


# ------------------------------------------------------------------------------- queue, failures, ranks
def test_full_queue_blocks_training_and_the_wait_is_returned(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path / "run")
    module, engine, ema = make_state(cfg)
    gate = threading.Event()
    real_upload = storage.upload

    def gated_upload(local, url):  # test double: an upload that hangs until the test opens the gate
        gate.wait()
        real_upload(local, url)

    monkeypatch.setattr(storage, "upload", gated_upload)
    manager = CheckpointManager(cfg.run.output, keep_last=5, queue_size=1)
    manager.save(1, engine, ema, {})  # taken by the worker, which then blocks in upload
    deadline = time.monotonic() + 30
    while manager._queue.qsize() and time.monotonic() < deadline:  # wait until the worker holds job 1
        time.sleep(0.01)
    manager.save(2, engine, ema, {})  # fills the queue's one slot
    opened = []
    timer = threading.Timer(0.3, lambda: (opened.append(True), gate.set()))
    timer.start()
    stall = manager.save(3, engine, ema, {})  # must wait until the gate opens and job 2 leaves the queue
    assert opened == [True]  # save 3 returned only after the uploads were released
    assert stall > 0.0
    manager.close()
    assert ckpt.list_steps(cfg.run.output) == [1, 2, 3]


def test_transient_upload_errors_are_retried(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path / "run")
    module, engine, ema = make_state(cfg)
    real_upload = storage.upload
    calls = {"n": 0}

    def flaky_upload(local, url):  # test double: every third upload call fails like a dropped connection
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise ConnectionResetError(104, "Connection reset by peer (injected)")
        real_upload(local, url)

    monkeypatch.setattr(storage, "upload", flaky_upload)
    monkeypatch.setattr(ckpt.time, "sleep", lambda s: None)  # the whole-upload retry backoff
    manager = CheckpointManager(cfg.run.output)
    manager.save(1, engine, ema, {}, module=module)
    manager.close()
    assert calls["n"] > 3
    assert latest_valid(cfg.run.output, "sha256").step == 1


def test_a_failed_upload_leaves_the_previous_checkpoint_valid(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path / "run")
    module, engine, ema = make_state(cfg)
    manager = CheckpointManager(cfg.run.output, keep_last=1)
    manager.save(1, engine, ema, {}, module=module)
    manager.wait()
    real_upload = storage.upload
    count = {"n": 0}

    def broken_upload(local, url):  # test double: storage dies after the first file of step 2
        count["n"] += 1
        if count["n"] > 1:
            raise OSError(5, "injected permanent failure")
        real_upload(local, url)

    monkeypatch.setattr(storage, "upload", broken_upload)
    monkeypatch.setattr(ckpt.time, "sleep", lambda s: None)
    manager.save(2, engine, ema, {}, module=module)
    with pytest.raises(CheckpointError, match=r"failed for steps \[2\]"):
        manager.close()
    assert latest_valid(cfg.run.output, "sha256").step == 1  # keep_last=1 did not prune it
    assert prepare_output(cfg).step == 1 and ckpt.list_steps(cfg.run.output) == [1]


def test_two_ranks_one_manifest_written_after_both_parts(tmp_path):
    """Two managers (ranks 0 and 1, threads here) share one output: rank 0's manifest lists both ranks'
    files and appears only once rank 1's part is uploaded."""
    cfg = make_cfg(tmp_path / "run")
    states = [make_state(cfg, seed=r) for r in range(2)]
    managers = [CheckpointManager(cfg.run.output, rank=r, world_size=2, part_timeout_s=60) for r in range(2)]
    managers[0].save(1, states[0][1], states[0][2], {}, module=states[0][0])
    url = Path(cfg.run.output) / "checkpoints" / "step_00000001"
    deadline = time.monotonic() + 30
    while not (url / "parts" / "rank_00000.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    assert not (url / "MANIFEST.json").exists()  # rank 1 has not saved yet
    managers[1].save(1, states[1][1], states[1][2], {}, module=states[1][0])
    for m in (managers[1], managers[0]):
        m.close()
    manifest = json.loads((url / "MANIFEST.json").read_text())
    assert manifest["world_size"] == 2
    assert {rel.split("/")[0] for rel in manifest["files"]} == {"rank_00000", "rank_00001"}
    assert latest_valid(cfg.run.output, "sha256").step == 1
    from safetensors.torch import load_file  # rank 1's part holds rank 1's weights (torch engines stand in here)

    saved = load_file(str(url / "rank_00001" / "state.safetensors"))
    masters = [saved[f"master/{n}"] for n, p in states[1][0].named_parameters()]
    assert torch.equal(torch.cat(masters), flat(states[1][0]))


# -------------------------------------------------------------------------------- kill -9 during upload
KILLED_UPLOAD_CHILD = r"""
import sys, time, torch
sys.path.insert(0, {root!r})
from data_pipeline import storage
from trainer.checkpoint.store import CheckpointManager
from tests.trainer.checkpoint.test_checkpoint import make_cfg, make_state
cfg = make_cfg({output!r})
module, engine, ema = make_state(cfg)
manager = CheckpointManager(cfg.run.output, keep_last=1)
manager.save(1, engine, ema, {{}}, module=module)
manager.wait()
real_upload = storage.upload
def stalling_upload(local, url):  # test double: the second file of step 2 never finishes
    real_upload(local, url)
    print("UPLOADING", flush=True)
    time.sleep(3600)
with torch.no_grad():
    for p in module.parameters():
        p.add_(1.0)
storage.upload = stalling_upload
manager.save(2, engine, ema, {{}}, module=module)
time.sleep(3600)
"""


def run_killed_upload(output: str, env: dict | None = None) -> None:
    code = KILLED_UPLOAD_CHILD.format(root=str(ROOT), output=output)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})}, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "UPLOADING", proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def check_after_kill(output: str) -> None:
    steps_before = ckpt.list_steps(output)
    assert steps_before == [1, 2]  # step 2 is partial: a file, no manifest
    cfg = make_cfg(output)
    info = prepare_output(cfg)
    assert info.step == 1 and ckpt.list_steps(output) == [1]  # ignored, then cleaned up
    module, engine, ema = make_state(cfg, seed=3)
    CheckpointManager(output).load(info, engine, ema, module)
    assert torch.equal(flat(module), flat(make_state(cfg)[0]))  # the step-1 weights, not the +1 of step 2


def test_kill_during_upload_keeps_previous_checkpoint(tmp_path):
    output = str(tmp_path / "run")
    run_killed_upload(output)
    check_after_kill(output)


# --------------------------------------------------------------------------------------- S3 on loopback
class FaultInjectingS3:
    """Test double for a flaky S3 endpoint: a WSGI wrapper around moto's app on its own loopback server
    that answers some requests with 503 SlowDown and drops the connection on others without an answer
    (shutdown, then an abortive close: the client sees the connection die mid-request). Real HTTP, real
    sockets: s3fs/botocore see the same failures as from an overloaded endpoint."""

    def __init__(self, fail_every: int = 3):
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        self.app = DomainDispatcherApplication(create_backend_app)
        self.fail_every, self.count, self.injected = fail_every, 0, {"503": 0, "reset": 0}
        self.enabled = False
        self.lock = threading.Lock()
        self.server = make_server("127.0.0.1", 0, self, threaded=True)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def __call__(self, environ, start_response):
        with self.lock:
            self.count += 1
            fault = self.enabled and self.count % self.fail_every == 0
            kind = "503" if (self.count // self.fail_every) % 2 else "reset"
            if fault:
                self.injected[kind] += 1
        if fault and kind == "503":
            from werkzeug.wrappers import Request

            Request(environ).get_data()  # consume the body (sized or chunked), or it reads as the next request
            body = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
            start_response("503 Service Unavailable", [("Content-Type", "application/xml"),
                                                        ("Content-Length", str(len(body))), ("Connection", "close")])
            return [body]
        if fault:
            import socket
            import struct

            sock = environ["werkzeug.socket"]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            sock.shutdown(socket.SHUT_RDWR)  # acts now (close() waits for the handler's file objects)
            raise ConnectionResetError("injected reset")  # werkzeug drops the request, then closes
        return self.app(environ, start_response)

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def flaky_s3(s3_server, monkeypatch):
    server = FaultInjectingS3()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY_S", 0.01)
    try:
        yield server
    finally:
        server.stop()


def test_s3_checkpoint_with_injected_5xx_and_resets(flaky_s3, tmp_path):
    bucket = f"ckpt-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    output = f"s3://{bucket}/runs/flaky"
    storage.makedirs(output)
    cfg = make_cfg(output)
    module, engine, ema = make_state(cfg)
    gen = torch.Generator().manual_seed(1)
    train_steps(module, engine, ema, 2, gen)
    flaky_s3.enabled = True
    manager = CheckpointManager(output, keep_last=1)
    for step in (1, 2):
        save_state(cfg, manager, step, engine, ema, module, data_state={"pos": step}, generators={"g": gen})
    manager.close()
    info = prepare_output(cfg)
    module2, engine2, ema2 = make_state(cfg, seed=5)
    state = resume_state(cfg, CheckpointManager(output), info, engine2, ema2, module2,
                         {"g": torch.Generator()})
    flaky_s3.enabled = False
    assert flaky_s3.injected["503"] > 0 and flaky_s3.injected["reset"] > 0
    assert state.step == 2 and state.data_state == {"pos": 2}
    assert ckpt.list_steps(output) == [2]  # retention ran on S3 too
    assert torch.equal(flat(module2), flat(module))
    assert latest_valid(output, "sha256").step == 2


def test_s3_kill_during_upload_keeps_previous_checkpoint(s3_server):
    bucket = f"kill-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    output = f"s3://{bucket}/runs/killed"
    storage.makedirs(output)
    run_killed_upload(output, env={"AWS_ENDPOINT_URL": s3_server})
    check_after_kill(output)


# ------------------------------------------------------------------------------- 2 ranks, DeepSpeed ZeRO-3
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_zero3_two_ranks_checkpoint_resume_and_ema_consolidation(tmp_path):
    from safetensors.torch import save_file

    from tests.trainer.checkpoint_workers import ds_checkpoint_run
    from tests.trainer.ds_spawn import run_ranks
    from tests.trainer.tiny_flux import TinyFlux
    from trainer.export.pipeline import consolidate_ema

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in TinyFlux().state_dict().items()}, str(teacher))
    output = str(tmp_path / "run")
    results = run_ranks(ds_checkpoint_run, 2, output, str(teacher), timeout=240)
    for r in results:
        assert r["replay"] == r["losses"][2:]  # bit-exact after resuming from step 2 (shards, EMA, RNG)
        assert r["cursor"] == 2
    info = latest_valid(output, "sha256")
    assert info.step == 4 and info.manifest["world_size"] == 2
    assert "rank_00001/state.safetensors" in info.manifest["files"]
    assert all(rel.endswith((".safetensors", ".json", "client.pt")) for rel in info.manifest["files"])
    for r in results:
        assert r["unsafe_loads"] == []  # the resume never called torch.load without weights_only=True
    ema = consolidate_ema(info)  # from the two ranks' partitions, no engine
    gathered = torch.load(f"{output}.gathered_ema.pt", weights_only=True)
    assert set(ema) == set(gathered)
    for name in gathered:
        assert torch.equal(ema[name], gathered[name].float()), name


# ------------------------------------------------------------------- verified loading (issue 12)
def two_checkpoints(tmp_path):
    cfg = make_cfg(tmp_path / "run")
    module, engine, ema = make_state(cfg)
    gen = torch.Generator().manual_seed(5)
    manager = CheckpointManager(cfg.run.output, keep_last=10)
    for step in (1, 2):
        train_steps(module, engine, ema, 1, gen)
        save_state(cfg, manager, step, engine, ema, module, data_state={"cursor": step}, generators={"g": gen})
        manager.wait()
    manager.close()
    return cfg, Path(cfg.run.output) / "checkpoints"


def edit_manifest(ckpt_dir: Path, change) -> None:
    path = ckpt_dir / "MANIFEST.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_manifest_path_outside_the_checkpoint_is_rejected(tmp_path, caplog):
    from trainer.export.pipeline import resolve_checkpoint

    cfg, root = two_checkpoints(tmp_path)

    def escape(data):
        meta = data["files"].pop("rank_00000/client.pt")
        data["files"]["rank_00000/../../x"] = meta

    edit_manifest(root / "step_00000002", escape)
    with caplog.at_level("WARNING"):
        info = latest_valid(cfg.run.output)
    assert info.step == 1  # skipped, with a warning naming the file and the path
    assert "step_00000002/MANIFEST.json" in caplog.text and "'rank_00000/../../x'" in caplog.text
    with pytest.raises(CheckpointError, match=r"not a relative path inside a rank dir"):
        resolve_checkpoint(str(root / "step_00000002"))
    for bad in ("/etc/passwd", "rank_00000/a\\..\\b", "rank_1/x", "../rank_00000/x", "rank_00000/./x"):
        with pytest.raises(CheckpointError):
            ckpt.check_rel(bad, "here")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("change,message", [
    (lambda d: d.pop("files"), "key 'files' must be dict"),
    (lambda d: d.update(files=[]), "key 'files' must be dict"),
    (lambda d: d.update(world_size="2"), "key 'world_size' must be int"),
    (lambda d: d.update(format=1), "format 1, this version reads format 2"),
    (lambda d: d["files"].update({"rank_00000/client.pt": {"size": 3}}), "must be"),
    (lambda d: d["files"].update({"rank_00003/x.json": d["files"]["rank_00000/client.pt"]}), "ranks \\[3\\]"),
])
def test_manifest_of_wrong_structure_is_a_clear_error_not_a_keyerror(tmp_path, caplog, change, message):
    cfg, root = two_checkpoints(tmp_path)
    edit_manifest(root / "step_00000002", change)
    with pytest.raises(CheckpointError, match=message):
        ckpt.read_manifest(str(root / "step_00000002"))
    with caplog.at_level("WARNING"):
        assert latest_valid(cfg.run.output).step == 1
    assert "skipping checkpoint" in caplog.text


def test_sha256_mismatch_in_the_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    cfg, root = two_checkpoints(tmp_path)
    target = root / "step_00000002" / "rank_00000" / "state.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF  # same size: only the checksum can tell
    target.write_bytes(bytes(data))
    info = prepare_output(cfg)
    assert info.step == 2  # the listing check (sizes) passes; the download check must catch it
    module, engine, ema = make_state(cfg, seed=9)
    with caplog.at_level("WARNING"):
        state = resume_state(cfg, CheckpointManager(cfg.run.output), info, engine, ema, module,
                             {"g": torch.Generator()})
    assert state.step == 1 and state.data_state == {"cursor": 1}
    assert "step_00000002/rank_00000/state.safetensors: content does not match" in caplog.text
    assert "falling back" in caplog.text
    assert ckpt.list_steps(cfg.run.output) == [1]  # the rejected one is gone (the resumed run rewrites step 2)


def test_rank_part_with_escaping_path_is_rejected(tmp_path):
    cfg = make_cfg(tmp_path / "run")
    url = f"{cfg.run.output}/checkpoints/step_00000001"
    storage.put_bytes(f"{url}/parts/rank_00000.json", json.dumps(
        {"rank": 0, "step": 1, "files": {"rank_00000/../../../x": {"size": 1, "sha256": "0" * 64}}}).encode())
    with pytest.raises(CheckpointError, match="not a relative path"):
        CheckpointManager(cfg.run.output)._read_part(f"{url}/parts/rank_00000.json", 0, 1)


# ------------------------------------------------------------------ loud failures (issue 12)
def test_consecutive_failed_uploads_stop_the_run_with_the_cause(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path / "run", max_failed_uploads=2)
    module, engine, ema = make_state(cfg)

    def dead_upload(local, url):  # test double: the bucket refuses every write
        raise PermissionError(13, "AccessDenied (injected)")

    monkeypatch.setattr(storage, "upload", dead_upload)
    monkeypatch.setattr(ckpt.time, "sleep", lambda s: None)
    manager = CheckpointManager(cfg.run.output, max_failed_uploads=cfg.train.max_failed_uploads)
    manager.save(1, engine, ema, {})
    manager.wait()
    manager.save(2, engine, ema, {})  # one failure: training goes on
    manager.wait()
    with pytest.raises(CheckpointError, match=r"2 consecutive checkpoint uploads failed \(steps \[1, 2\]\).*"
                                              r"PermissionError.*AccessDenied"):
        manager.save(3, engine, ema, {})
    with pytest.raises(CheckpointError):
        manager.close()
    assert ckpt.list_steps(cfg.run.output) == []


def test_missing_rank_part_times_out_once_not_per_retry(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path / "run", ckpt_part_timeout_s=1.0)
    module, engine, ema = make_state(cfg)
    waits = []
    real_wait = CheckpointManager._wait_for_parts

    def counted(self, url, step):
        waits.append(step)
        return real_wait(self, url, step)

    monkeypatch.setattr(CheckpointManager, "_wait_for_parts", counted)
    manager = CheckpointManager(cfg.run.output, rank=0, world_size=2, part_timeout_s=cfg.train.ckpt_part_timeout_s)
    manager.save(1, engine, ema, {})  # rank 1 never uploads its part
    manager.wait()
    assert waits == [1]  # one wait of ckpt_part_timeout_s, not UPLOAD_ATTEMPTS of them
    assert manager.failed_steps == [1] and "rank 1's part" in manager.last_failure
    with pytest.raises(CheckpointError, match="ckpt_part_timeout_s"):
        manager.close()
    assert latest_valid(cfg.run.output) is None


def test_fault_config_keys_have_ranges():
    from trainer.config import ConfigError

    for key, bad in (("max_nonfinite_steps", 0), ("max_failed_uploads", 0), ("ckpt_part_timeout_s", float("nan")),
                     ("ckpt_part_timeout_s", 0.0)):
        with pytest.raises(ConfigError, match=f"train.{key}"):
            config_from_dict({"train": {key: bad}})
    cfg = config_from_dict({})
    assert (cfg.train.max_nonfinite_steps, cfg.train.max_failed_uploads, cfg.train.ckpt_part_timeout_s) == (10, 2, 300.0)


def test_no_pickle_on_any_load_path_in_the_source():
    """Every torch.load in the packages passes weights_only=True; no pickle.load, no DeepSpeed checkpoint
    loading (its engine loads with weights_only=False)."""
    offenders = []
    for pkg in ("trainer", "cluster", "models", "data_pipeline"):
        for path in (ROOT / pkg).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), start=1):
                code = line.split("#")[0]
                if ("torch.load(" in code and "weights_only=True" not in code) or "pickle.load" in code \
                        or ".load_checkpoint(" in code or "allow_pickle=True" in code:
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
