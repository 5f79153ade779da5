"""Periodic full evaluation during a distributed run (`eval.full_every`, issue 14).

`FullEvalWatcher` runs in the driver beside the student group. A thread polls run.output (local or s3://) for
the newest valid checkpoint; when its step is a multiple of `eval.full_every` and newer than the last one
evaluated, it starts `cluster.jobs.eval.eval_checkpoint` (what `piflow eval` does) as a Ray task with the
resources of one teacher replica (`teacher.cpus_per_replica`, `teacher.gpus_per_replica`,
`teacher.custom_resource`: a GPU on the teacher's nodes when the teacher group has GPUs), so training never
waits for it. One evaluation at a time: checkpoints that become due while one runs are skipped except the
newest (logged). Results land in RUN/eval/step_XXXXXXX/; the metrics go to RUN/eval/metrics.jsonl (and to a
wandb run `<run.name>-eval` when wandb is on) with the checkpoint step as their step. A failed evaluation is
logged with its cause and never stops training. At the end of training the driver waits (at most
`eval.full_wait_s`) for the running evaluation, then evaluates the final checkpoint if it is due.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Optional

from trainer.config import Config

log = logging.getLogger(__name__)


def _evaluated_steps(cfg: Config) -> list[int]:
    """Steps with a results.json under RUN/eval/ (a resumed run does not evaluate them again)."""
    from data_pipeline import storage

    root = storage.join(cfg.run.output, "eval")
    steps = []
    for name in storage.listdir(root) if storage.exists(root) else []:
        name = name.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("step_") and name[5:].isdigit() and \
                storage.exists(storage.join(root, name, "results.json")):
            steps.append(int(name[5:]))
    return sorted(steps)


class FullEvalWatcher:
    def __init__(self, cfg: Config, poll_s: float = 2.0):
        from cluster.student_group import absolute_local_paths

        from data_pipeline import storage

        cfg = absolute_local_paths(cfg)  # the task runs in a Ray worker, elsewhere
        # object storage: a few LIST requests per poll, so not more often than every 10 s
        self.cfg, self.every = cfg, cfg.eval.full_every
        self.poll_s = max(poll_s, 10.0) if storage.is_s3(cfg.run.output) else poll_s
        self.results: list[dict] = []  # per finished evaluation: {"step", "rows", "out"} or {"step", "error"}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._running: Optional[tuple[int, Any]] = None  # (step, ObjectRef)
        self._logger = None
        self._last = 0

    # ------------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "FullEvalWatcher":
        if self.every:
            done = _evaluated_steps(self.cfg)
            self._last = done[-1] if done else 0
            self._thread = threading.Thread(target=self._follow, name="full-eval", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.every:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if exc_type is None:
                self.finish()
            elif self._running is not None:  # training failed: do not keep the cluster busy for an eval
                import ray

                ray.cancel(self._running[1], force=True)
                log.warning("full eval: training failed; evaluation of step %d cancelled", self._running[0])
        finally:
            if self._logger is not None:
                self._logger.close()

    def finish(self) -> None:
        """After training: the running evaluation (bounded by eval.full_wait_s), then the final checkpoint's
        evaluation if it is due and not done yet (same bound, counted from here)."""
        deadline = time.monotonic() + self.cfg.eval.full_wait_s
        with self._lock:
            self._wait(deadline)
            self._tick()
            self._wait(deadline)

    def _wait(self, deadline: float) -> None:
        import ray

        if self._running is None:
            return
        step, ref = self._running
        print(f"piflow: waiting for the full evaluation of step {step} (at most "
              f"{max(0.0, deadline - time.monotonic()):.0f} s, eval.full_wait_s)", flush=True)
        ready, _ = ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()))
        if ready:
            self._collect()
        else:
            ray.cancel(ref, force=True)
            self._running = None
            msg = f"full eval of step {step}: not done within eval.full_wait_s={self.cfg.eval.full_wait_s:g} s; cancelled"
            log.warning(msg)
            print(f"piflow: {msg}", flush=True)
            self.results.append({"step": step, "error": msg})

    # ---------------------------------------------------------------------------------------- polling
    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                try:
                    self._tick()
                except Exception as e:  # noqa: BLE001 - storage hiccups: try again at the next poll
                    log.warning("full eval: checking for new checkpoints failed (%s); retrying", e)

    def _tick(self) -> None:
        """Collect a finished evaluation; start one on the newest due checkpoint when none runs."""
        import ray

        from trainer.checkpoint.store import latest_valid, list_steps

        if self._running is not None:
            ready, _ = ray.wait([self._running[1]], timeout=0)
            if not ready:
                return
            self._collect()
        steps = list_steps(self.cfg.run.output)
        if not steps or steps[-1] <= self._last:  # nothing new: one listing per poll, no manifest reads
            return
        info = latest_valid(self.cfg.run.output)
        if info is None or info.step <= self._last or info.step % self.every:
            return
        skipped = [s for s in steps if self._last < s < info.step and s % self.every == 0]
        if skipped:
            print(f"piflow: full eval skips checkpoint step(s) {skipped}: step {info.step} is newer "
                  "(one evaluation at a time, the newest next)", flush=True)
        self._last = info.step
        self._running = (info.step, self._remote().remote(self.cfg.to_dict(), info.url, info.step))
        print(f"piflow: full eval of checkpoint step {info.step} started ({info.url})", flush=True)

    def _remote(self):
        import ray

        from cluster.jobs.eval import eval_checkpoint

        t = self.cfg.teacher
        opts: dict[str, Any] = {"num_cpus": t.cpus_per_replica, "num_gpus": t.gpus_per_replica, "max_retries": 0}
        if t.custom_resource:  # on the teacher group's nodes
            opts["resources"] = {t.custom_resource: 1.0}
        return ray.remote(eval_checkpoint).options(**opts)

    def _collect(self) -> None:
        import ray

        step, ref = self._running
        self._running = None
        try:
            result = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - a failed evaluation is reported, training goes on
            cause = str(e).strip().splitlines()[-1][:500] if str(e).strip() else type(e).__name__
            msg = f"full eval of checkpoint step {step} failed: {cause}"
            log.warning(msg)
            print(f"piflow: {msg}", flush=True)
            self.results.append({"step": step, "error": cause})
            return
        self.results.append(result)
        from trainer.evaluation.report import slug

        values = {f"eval_job/{slug(r['method'])}/{k}": v for r in result["rows"] for k, v in r.items()
                  if isinstance(v, float)}
        self._metrics().log(step, values)
        self._metrics().flush()
        table = " | ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in values.items() if "fid" in k)
        print(f"piflow: full eval of step {step}: {table} -> {result['out']}", flush=True)

    def _metrics(self):
        """RUN/eval/metrics.jsonl (one record per evaluation, step = checkpoint step) and a wandb run of its own:
        the training run's wandb run is open in rank 0's process, and offline runs take one writer."""
        if self._logger is None:
            from data_pipeline import storage
            from trainer.metrics import MetricsLogger

            cfg = dataclasses.replace(self.cfg, run=dataclasses.replace(self.cfg.run, name=f"{self.cfg.run.name}-eval"))
            self._logger = MetricsLogger(cfg, storage.join(self.cfg.run.output, "eval"), console_every=0)
        return self._logger
