"""Which failures a restart can fix (issue 21): only infrastructure ones are retried.

INFRASTRUCTURE: a dead process or node, a lost actor, a timeout, a broken connection (a rank's peers see a
killed rank as a closed gloo/NCCL connection), an object-store outage that outlasted data_pipeline/storage.py's
retries (5xx, throttling, resets), a Ray Train worker group that did not start in time. A restart on healthy
(or replacement) resources can get past it.

DETERMINISTIC: everything else: config and model-build errors, shape errors, a missing file, a non-finite stop,
another run holding the output. A restart would replay the same code on the same inputs into the same error,
so the group stops at once with the first failing rank's one-line message.

`kind(error)` classifies a live exception (the ranks record it with their failure, cluster/student_group.py);
`group_failure(...)` classifies what Ray Train's `fit()` raised, using those records.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

INFRASTRUCTURE, DETERMINISTIC = "infrastructure", "deterministic"

# What a rank sees when a peer process or node is gone, or a transport gives up (gloo, NCCL, sockets).
_LOST_PEER = re.compile(
    r"connection (closed|reset|refused|timed out)|closed by peer|reset by peer|broken pipe|socket timeout|"
    r"timed out|timeout|transport endpoint|no route to host|communicator was aborted|watchdog caught",
    re.IGNORECASE)
# Our own: a rank of an attempt that a newer one replaced (the feed refuses it).
_INFRA_NAMES = {"StaleAttempt"}


def _infra_types() -> tuple[type, ...]:
    import concurrent.futures

    import ray.exceptions as rx

    types: list[type] = [TimeoutError, ConnectionError, concurrent.futures.TimeoutError,
                         rx.RayActorError, rx.NodeDiedError, rx.WorkerCrashedError, rx.LocalRayletDiedError,
                         rx.ObjectLostError, rx.OwnerDiedError, rx.ObjectFetchTimedOutError, rx.GetTimeoutError,
                         rx.RaySystemError, rx.OutOfMemoryError, rx.OutOfDiskError, rx.RpcError]
    try:
        import torch.distributed as dist

        types.append(dist.DistError)  # DistBackendError, DistNetworkError, DistStoreError
    except (ImportError, AttributeError):
        pass
    return tuple(types)


def _chain(error: BaseException, depth: int = 8):
    seen = set()
    while error is not None and id(error) not in seen and depth > 0:
        seen.add(id(error))
        yield error
        cause = getattr(error, "cause", None)  # RayTaskError: the exception raised inside the task
        error = cause if isinstance(cause, BaseException) else (error.__cause__ or error.__context__)
        depth -= 1


def kind(error: BaseException) -> str:
    """INFRASTRUCTURE or DETERMINISTIC (see the module docstring). Follows causes: a RuntimeError raised
    because a teacher replica died for good is infrastructure; a ValueError raised inside an actor method
    (RayTaskError) is deterministic."""
    import ray.exceptions as rx

    from data_pipeline.storage import is_transient

    infra = _infra_types()
    if is_transient(error):  # the object store's transient failures, by storage.py's own rule
        return INFRASTRUCTURE
    for e in _chain(error):
        if isinstance(e, rx.RayTaskError):
            continue  # its cause decides
        if isinstance(e, infra) or type(e).__name__ in _INFRA_NAMES:
            return INFRASTRUCTURE
        if type(e) in (RuntimeError, OSError) and _LOST_PEER.search(str(e)):  # not subclasses: FileNotFoundError
            return INFRASTRUCTURE
    return DETERMINISTIC


@dataclass(frozen=True)
class GroupFailure:
    kind: str
    rank: Optional[int]  # the first failing rank (None: the group never started)
    type: str
    message: str  # one line
    startup: bool = False  # the worker group did not start (resources)

    def describe(self) -> str:
        who = f"rank {self.rank}: " if self.rank is not None else ""
        return f"{who}{self.type}: {self.message}" if self.message else f"{who}{self.type}"


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:500] if text else ""


def group_failure(error: BaseException, first_record: Optional[dict[str, Any]]) -> GroupFailure:
    """Classify what `TorchTrainer.fit()` raised. `first_record`: the earliest failure a rank of this attempt
    recorded (`student_group.first_failure`), which names the error that started it: its peers then fail too
    (lost connections), and Ray Train kills the rest."""
    from ray.train import ControllerError, WorkerGroupError

    try:
        from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    except ImportError:  # pragma: no cover - Ray Train v1
        WorkerGroupStartupTimeoutError = ()  # type: ignore[assignment]
    if isinstance(error, ControllerError):
        cause = error.controller_failure
        return GroupFailure(INFRASTRUCTURE, None, type(cause).__name__, one_line(cause),
                            startup=isinstance(cause, WorkerGroupStartupTimeoutError))
    if isinstance(error, WorkerGroupError):
        import ray.exceptions as rx

        from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError

        failures = {int(r): e for r, e in error.worker_failures.items()}
        gone = (rx.RayActorError, WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError)
        dead = sorted(r for r, e in failures.items() if isinstance(e, gone))
        if dead:  # a rank's process (or its node) is gone: what its peers recorded follows from it
            e = failures[dead[0]]
            return GroupFailure(INFRASTRUCTURE, dead[0], type(e).__name__, one_line(e))
        if first_record is not None:
            return GroupFailure(first_record.get("kind") or DETERMINISTIC, int(first_record["rank"]),
                                first_record["type"], first_record.get("error", ""))
        if failures:
            r = min(failures)
            return GroupFailure(kind(failures[r]), r, type(failures[r]).__name__, one_line(failures[r]))
    return GroupFailure(kind(error), None, type(error).__name__, one_line(error))
