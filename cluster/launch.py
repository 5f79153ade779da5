"""Start a training run: in this process (`train.engine: torch`, one worker) or distributed over Ray
(`train.engine: deepspeed`: `launch_distributed`).

`launch_training(cfg, config_path)` is what `piflow train` calls after the config has been validated.
"""
from __future__ import annotations

from trainer.config import Config, ConfigError


def launch_training(cfg: Config, config_path: str | None = None) -> None:
    """Preflight (cluster/preflight.py: config, output URL and a storage round trip, shards, teacher weights,
    resume world size; before anything is deleted or started), then the output's single-writer lease
    (trainer/checkpoint/lease.py) for the whole run, then the run itself."""
    engine, workers = cfg.train.engine, cfg.cluster.student.workers
    if engine == "torch" and workers != 1:
        raise ConfigError(f"{config_path or '<config>'}: key 'cluster.student.workers': train.engine: torch "
                          f"runs in one process, got {workers} workers (use train.engine: deepspeed)")
    if engine not in ("torch", "deepspeed"):  # the config's Literal makes this unreachable
        raise ConfigError(f"{config_path or '<config>'}: key 'train.engine': unknown engine {engine!r}")
    from cluster.preflight import preflight
    from trainer.checkpoint.lease import Lease, new_run_id

    preflight(cfg, config_path)
    run_id = new_run_id(cfg.run.name)
    with Lease(cfg.run.output, run_id, cfg.run.lease_heartbeat_s) as lease:
        if engine == "torch":
            from trainer.local_run import run_local

            run = run_local(cfg, guard=lease.check)
            print(f"done: {run.steps} steps; metrics in {run.metrics_path}")
        else:
            launch_distributed(cfg, run_id=run_id)


def write_config(cfg: Config) -> None:
    """`<run.output>/config.yaml`: the resolved config of every run (local or object storage)."""
    from data_pipeline import storage
    from trainer.config import dump_config

    storage.put_bytes(storage.join(cfg.run.output, "config.yaml"), dump_config(cfg).encode())


def launch_distributed(cfg: Config, run_id: str = "") -> list[dict]:
    """`train.engine: deepspeed`: Ray up (embedded `local` or `cluster.address`), the TeacherServer group
    (separate placement), the prompt feed (`data.shards`), the student group under Ray Train; everything
    started here is stopped in `finally`. Prints the startup phases and a summary; returns the rank summaries."""
    import ray

    from cluster.orchestrator import connect, data_placement, start_teacher_group
    from cluster.student_group import cond_shapes_without_prompts, run_student_group
    from trainer.metrics import PhaseTimes

    import dataclasses

    from trainer.checkpoint import resume

    from cluster.capacity import check as check_capacity

    times = PhaseTimes()  # startup per phase (issue 7); the ranks print student_init / first_step
    own_ray = not ray.is_initialized()  # a Ray this call starts is shut down here; a caller's is left alone
    group = feed = validation = None
    try:
        import time

        t0 = time.perf_counter()
        connect(cfg)
        check_capacity(cfg)  # issue 21: one line naming what the cluster lacks, before anything is deleted
        times.add("ray_up", time.perf_counter() - t0)
        # Fresh start vs resume is decided here, once per run (applying --force); the ranks, also when the
        # group is restarted, only resume from the newest valid checkpoint.
        resume.prepare_output(cfg, rank=0)
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, force=False))
        write_config(cfg)
        with times.phase("teacher_load"):
            group = start_teacher_group(cfg)  # None in shared placement
        from cluster.validation import start_validation

        with times.phase("validation_encode"):  # once, on the teacher group (issue 13)
            validation = start_validation(cfg, group.servers if group else None)
        if cfg.data.shards:
            from cluster.data_worker import start_data_feed

            with times.phase("data_feed"):
                feed = start_data_feed(cfg, data_placement(cfg))
        from cluster.full_eval import FullEvalWatcher

        # issue 14: `piflow eval` on new checkpoints (eval.full_every) as Ray tasks beside training
        with FullEvalWatcher(cfg) as full_eval, MetricsProgress(cfg):
            summaries = run_student_group(cfg, group.servers if group else None,
                                          None if feed else cond_shapes_without_prompts(cfg),
                                          feed=feed.actor if feed else None, run_id=run_id, validation=validation)
        data_metrics = feed.metrics() if feed else {}
    finally:
        if feed is not None:
            feed.shutdown()
        if validation is not None and validation["own"]:
            ray.kill(validation["actor"])
        if group is not None:
            group.shutdown()
        if own_ray:
            ray.shutdown()
    times.merge_max([s.get("startup", {}) for s in summaries])
    print(f"piflow: {times.format()}")
    print(format_summary(summaries, data_metrics), flush=True)
    for r in full_eval.results:
        print(f"  full eval step {r['step']}: " + (f"FAILED: {r['error']}" if "error" in r else r["out"]))
    return summaries


class MetricsProgress:
    """A progress bar in the driver that follows rank 0's metrics log on run.output (the ranks run in Ray
    workers, maybe on other nodes): a local metrics.jsonl, or its segments on object storage, where only the
    segments not read yet are fetched (every 5 s)."""

    def __init__(self, cfg: Config, poll_s: float = 1.0):
        import threading

        from data_pipeline import storage

        self.url = storage.join(cfg.run.output, "metrics.jsonl")
        self.segmented = storage.is_s3(self.url)
        self.total = cfg.train.iters
        self.poll_s = max(poll_s, 5.0) if self.segmented else poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="metrics-progress", daemon=True)

    def __enter__(self) -> "MetricsProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _new_records(self):
        """Records appended since the last call (a generator over the file or the new segments)."""
        import json
        import os

        from data_pipeline import storage
        from trainer.record_log import segments

        if self.segmented:
            for n, url in segments(self.url):
                if n >= self._next_segment:
                    self._next_segment = n + 1
                    for line in storage.get_bytes(url).decode("utf-8").splitlines():
                        yield line
            return
        if not os.path.exists(self.url):
            return
        if os.path.getsize(self.url) < self._offset:
            self._offset = 0  # a resuming rank 0 truncated the records past its checkpoint
        with open(self.url) as f:
            f.seek(self._offset)
            for line in f:
                if not line.endswith("\n"):
                    break  # half-written: read it next time
                self._offset += len(line.encode())
                yield line

    def _follow(self) -> None:
        import json

        from tqdm.auto import tqdm

        bar = tqdm(total=self.total, desc="pi-ID", unit="step", dynamic_ncols=True)
        self._offset, self._next_segment, done = 0, 0, False
        while not done:
            done = self._stop.wait(self.poll_s)  # one last read after the run ends
            try:
                for line in self._new_records():
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    bar.n = int(record.get("step", bar.n))
                    if "loss" in record:
                        bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
            except Exception:  # noqa: BLE001 - a progress bar never fails the run (storage hiccup)
                pass
            bar.refresh()
        bar.close()


def format_summary(summaries: list[dict], data_metrics: dict) -> str:
    """The end-of-run lines: steps, where the metrics/checkpoints went, the last loss, teacher and data stats."""
    from trainer.metrics import read_metrics

    s0 = summaries[0]
    lines = [f"done: {s0['steps']} steps on {len(summaries)} ranks (started at step {s0.get('start_step', 0)}"
             + (f", resumed from {s0['resumed_from']}" if s0.get("resumed_from") else "") + ")",
             f"  metrics: {s0['metrics_path']}"]
    try:
        records = read_metrics(s0["metrics_path"])  # from run.output: local or object storage
    except FileNotFoundError:
        records = []
    if records:
        last = records[-1]
        lines.append(f"  last step {last['step']}: loss {last['loss']:.6g} (mean over ranks)")
    if s0.get("checkpoint_steps"):
        lines.append(f"  checkpoints written this session: steps {s0['checkpoint_steps']}")
    for stats in s0.get("teacher_stats", []):
        lines.append(f"  teacher: {stats['requests']} requests in {stats['batches']} batches, "
                     f"mean latency {stats['mean_latency_s'] * 1000:.1f} ms, cond puts {stats['cond_puts']}")
    if data_metrics:
        lines.append("  data: " + ", ".join(f"{k} {v:g}" for k, v in sorted(data_metrics.items())))
    return "\n".join(lines)
