"""The single-writer lease on run.output (issue 11) on the moto S3 server: a second run on a held output is
refused naming the holder; a lease older than 3 heartbeats (or whose holder process on this host is gone) is
taken over; an old holder that wakes up after a takeover stops before it writes a log segment."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid

import pytest

from data_pipeline import storage
from trainer.checkpoint.lease import Lease, LeaseHeld, LeaseLost, check_holder, lease_url, read_lease
from trainer.record_log import RecordLog, segments


@pytest.fixture
def output(s3_server):
    bucket = f"lease-{uuid.uuid4().hex[:10]}"
    storage.makedirs(f"s3://{bucket}")
    return f"s3://{bucket}/runs/r"


def test_second_run_is_refused_naming_the_holder(output):
    with Lease(output, "run-a", heartbeat_s=30, settle_s=0):
        lease = read_lease(output)
        assert lease["run_id"] == "run-a" and lease["host"] == socket.gethostname()
        with pytest.raises(LeaseHeld, match=r"held by run 'run-a' on host") as e:
            Lease(output, "run-b", heartbeat_s=30, settle_s=0).acquire()
        assert "\n" not in str(e.value)
        check_holder(output, "run-a")  # the ranks' guard passes for the holder
        with pytest.raises(LeaseLost):
            check_holder(output, "run-b")
    assert read_lease(output) is None  # released at the end


def test_heartbeat_renews_the_lease(output):
    with Lease(output, "run-a", heartbeat_s=0.2, settle_s=0):
        first = read_lease(output)["heartbeat_unix"]
        time.sleep(0.7)
        assert read_lease(output)["heartbeat_unix"] > first


def test_stale_lease_is_taken_over_and_the_old_holder_stops_before_writing(output):
    old = Lease(output, "run-a", heartbeat_s=0.2, settle_s=0).acquire()
    old._stop.set()  # the old holder "sleeps": no heartbeats (a paused VM, a long GC, a network partition)
    old._thread.join()
    old._stop.clear()
    with pytest.raises(LeaseHeld):  # not stale yet: younger than 3 heartbeats
        Lease(output, "run-b", heartbeat_s=0.2, settle_s=0).acquire()
    time.sleep(0.8)  # > 3 heartbeats of 0.2 s
    new = Lease(output, "run-b", heartbeat_s=0.2, settle_s=0).acquire()
    assert read_lease(output)["run_id"] == "run-b"
    # the old holder wakes up: its next write is refused, and nothing of it reaches storage
    log_url = storage.join(output, "metrics.jsonl")
    log = RecordLog(log_url, resume_step=0, flush_steps=1, guard=old.check)
    with pytest.raises(LeaseLost, match=r"run-a.*run 'run-b'"):
        log.append({"step": 1})
    assert segments(log_url) == []
    old.release()  # does not delete the new holder's lease
    assert read_lease(output)["run_id"] == "run-b"
    new.release()


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(output):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    storage.put_bytes(lease_url(output), json.dumps({
        "run_id": "crashed", "host": socket.gethostname(), "pid": pid, "heartbeat_s": 3600,
        "heartbeat_unix": time.time()}).encode())
    with Lease(output, "rerun", heartbeat_s=30, settle_s=0):
        assert read_lease(output)["run_id"] == "rerun"
