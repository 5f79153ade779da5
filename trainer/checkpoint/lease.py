"""The single-writer lease on a run.output: `<output>/LEASE.json` names the run that writes there (run id,
host, pid) and when it last renewed it (`heartbeat_unix`, every `run.lease_heartbeat_s`).

- A run whose output holds a live lease of another run is refused (`LeaseHeld`, naming the holder).
- A lease older than 3 heartbeats is stale and may be taken over, as may one whose holder process is gone
  (same host, pid not running: a killed driver rerun at once need not wait).
- The holder's heartbeat thread reads the lease before renewing it: once another run holds it, it stops
  renewing and every later `check()` raises `LeaseLost`; the ranks call `check_holder` (one GET) before
  they write logs or checkpoints, so an old holder that wakes up stops before writing.

Object storage has no compare-and-swap here, so acquiring writes the lease and reads it back after a short
settle; two runs racing for a free output within that window are not excluded (they are started by hand).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Optional

from data_pipeline import storage

log = logging.getLogger(__name__)
LEASE_NAME = "LEASE.json"
STALE_HEARTBEATS = 3


class LeaseHeld(RuntimeError):
    """run.output is held by another live run."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run: it must not write to run.output any more."""


def lease_url(output: str) -> str:
    return storage.join(output, LEASE_NAME)


def new_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def read_lease(output: str) -> Optional[dict[str, Any]]:
    try:
        return json.loads(storage.get_bytes(lease_url(output)))
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("%s: unreadable lease; treating the output as free", lease_url(output))
        return None


def describe(lease: dict[str, Any], now: float) -> str:
    age = now - float(lease.get("heartbeat_unix", 0))
    return (f"run {lease.get('run_id')!r} on host {lease.get('host')!r} (pid {lease.get('pid')}), "
            f"last heartbeat {age:.0f}s ago")


def is_stale(lease: dict[str, Any], now: float) -> bool:
    age = now - float(lease.get("heartbeat_unix", 0))
    if age > STALE_HEARTBEATS * float(lease.get("heartbeat_s", 0)):
        return True
    return lease.get("host") == socket.gethostname() and not _pid_alive(int(lease.get("pid", -1)))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_holder(output: str, run_id: str) -> None:
    """Raise LeaseLost unless `run_id` holds the lease on `output` (the ranks' guard before they write)."""
    lease = read_lease(output)
    if lease is None or lease.get("run_id") != run_id:
        holder = describe(lease, time.time()) if lease else "nobody"
        raise LeaseLost(f"run.output {output}: this run ({run_id}) no longer holds {LEASE_NAME} (now held by "
                        f"{holder}); stopping before writing anything more")


class Lease:
    """Acquire with `acquire()` (or `with Lease(...)`), renew in a daemon thread, `release()` at the end."""

    def __init__(self, output: str, run_id: str, heartbeat_s: float = 30.0,
                 clock: Callable[[], float] = time.time, settle_s: Optional[float] = None):
        self.output, self.run_id, self.heartbeat_s, self.clock = output, run_id, heartbeat_s, clock
        self.settle_s = min(1.0, heartbeat_s / 4) if settle_s is None else settle_s
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._acquired = self.clock()

    def _record(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "heartbeat_s": self.heartbeat_s, "heartbeat_unix": self.clock(), "acquired_unix": self._acquired}

    def acquire(self) -> "Lease":
        current = read_lease(self.output)
        now = self.clock()
        if current is not None and current.get("run_id") != self.run_id:
            if not is_stale(current, now):
                raise LeaseHeld(
                    f"run.output {self.output} is held by {describe(current, now)}; stop that run, wait until its "
                    f"lease is stale ({STALE_HEARTBEATS} heartbeats = "
                    f"{STALE_HEARTBEATS * float(current.get('heartbeat_s', 0)):.0f}s), or set run.output elsewhere")
            log.warning("taking over the stale lease of %s on %s", describe(current, now), self.output)
        self._acquired = now
        storage.put_bytes(lease_url(self.output), json.dumps(self._record()).encode())
        time.sleep(self.settle_s)  # a racing writer's PUT lands within this window: read back who won
        current = read_lease(self.output)
        if current is None or current.get("run_id") != self.run_id:
            raise LeaseHeld(f"run.output {self.output}: another run took the lease at the same moment "
                            f"({describe(current, self.clock()) if current else 'gone'}); try again")
        self._thread = threading.Thread(target=self._beat, name="piflow-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = read_lease(self.output)
                if current is None or current.get("run_id") != self.run_id:
                    self.lost = describe(current, self.clock()) if current else "nobody (the lease was deleted)"
                    log.error("run.output %s: lease taken over by %s; this run stops writing", self.output,
                              self.lost)
                    return
                storage.put_bytes(lease_url(self.output), json.dumps(self._record()).encode())
            except Exception as e:  # noqa: BLE001 - storage hiccup: the next beat retries; staleness needs 3
                log.warning("lease heartbeat on %s failed: %s: %s", self.output, type(e).__name__, e)

    def check(self) -> None:
        """Raise LeaseLost when another run holds the output (read from storage: also true after a sleep)."""
        if self.lost is not None:
            raise LeaseLost(f"run.output {self.output}: this run ({self.run_id}) lost its lease to {self.lost}; "
                            f"stopping before writing anything more")
        try:
            check_holder(self.output, self.run_id)
        except LeaseLost as e:
            self.lost = str(e).split("now held by ", 1)[-1].split(")", 1)[0]
            raise

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.heartbeat_s))
        if self.lost is None:
            current = read_lease(self.output)
            if current is not None and current.get("run_id") == self.run_id:
                storage.remove(lease_url(self.output))

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
