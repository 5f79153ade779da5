"""The student group: `cluster.student.workers` Ray Train workers (TorchTrainer: Ray builds the process
group, gloo on CPU / nccl on GPU, and DeepSpeed ZeRO-3 runs inside), restarted by a `FailureConfig`.

Each worker runs `trainer.rank_program.run_rank` with a `RemoteTeacher` over the TeacherServer handles
(separate placement) or none (shared), and a `FeedIterator` factory over the launcher's BatchFeed actor
(prompt data) or none (data-free synthetic batches), and writes its summary to
`<output>/rank_summaries/rank_R.json` on run.output (local or object storage: the driver reads the summaries
from there, never from a node's disk). Ray Train's own run dir (`cluster.storage_path`) defaults to node-local
scratch: the ranks report no Ray Train checkpoints, everything that must survive is under run.output.

A rank's failure is recorded under `<output>/failures` (with its kind, cluster/failures.py) and re-raised. The
driver, not Ray Train, decides about restarts (issue 21): Ray Train runs each attempt with no retries of its
own, and `run_student_group` restarts the group only after an INFRASTRUCTURE failure (a dead process or node,
a lost actor, a timeout), at most `cluster.student.max_failures` times; a DETERMINISTIC one (config, model
build, shapes, a non-finite stop) stops the run at once with the first failing rank's one-line message. A
`NonFiniteError` is not even raised: every rank stops at the same step, finishes normally, and the driver
finds the record. Before a restart the driver waits up to `cluster.student.replacement_wait_s` for the cluster
to hold the whole group again; without a replacement node the run continues on the ranks that fit (resharded
resume, the same global batch over fewer ranks) and says so.
"""
from __future__ import annotations

import json
import os
from functools import partial
from typing import Any, Optional

from trainer.config import Config


def _backend(cfg: Config, use_gpu: bool) -> str:
    if cfg.cluster.backend != "auto":
        return cfg.cluster.backend
    return "nccl" if use_gpu else "gloo"


def _worker(config: dict) -> None:
    """One student rank (runs inside a Ray Train worker process)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train

    from cluster.data_worker import FeedIterator, group_attempt_id
    from cluster.teacher_server import RemoteTeacher
    from trainer import fault_injection
    from trainer.config import config_from_dict
    from trainer.loop import NonFiniteError
    from trainer.rank_program import run_rank
    from data_pipeline import storage
    from trainer.checkpoint.lease import check_holder
    from trainer.scratch import scratch_root

    cfg = config_from_dict(config["cfg"], source="<student group>")
    if config.get("inject_nan_steps"):  # soaks/tests: the driver's fault injection reaches ranks on any node
        os.environ[fault_injection.ENV] = config["inject_nan_steps"]
    if config.get("num_threads"):
        torch.set_num_threads(config["num_threads"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    # issue 12: one id per (re)start of the group; the feed rewinds to the cursor of each new attempt
    attempt = group_attempt_id()
    try:
        teacher = RemoteTeacher(config["servers"], rank, timeout_s=cfg.teacher.timeout_s) if config["servers"] else None
        feed = config["feed"]
        prompt_batches = None
        if feed is not None:  # this rank's slices of the one global stream the BatchFeed actor serves

            def feed_batches(info):
                return FeedIterator(feed, info.rank, info.world_size, cfg.data.layout, attempt=attempt,
                                    timeout_s=cfg.data.timeout_s, retries=1)

            prompt_batches = feed_batches
        elif cfg.data.shards:
            raise ValueError("data.shards is set but the student group got no data feed (cluster.launch starts it)")
        validation = None
        if config.get("validation"):  # prompts encoded once on the teacher group; rank 0 decodes there too
            from cluster.validation import RemoteValidation

            v = config["validation"]
            validation = RemoteValidation(v["actor"], v["prompts"], v["cond"], timeout_s=cfg.teacher.timeout_s)
        guard = partial(check_holder, config["output"], config["run_id"]) if config.get("run_id") else None
        if rank == 0:  # issue 21: rank 0 logs to W&B; its node may lack what the driver's had (before any model)
            from trainer.config import ConfigError
            from trainer.metrics import wandb_credentials_problem

            problem = wandb_credentials_problem(cfg)
            if problem:
                raise ConfigError(f"rank 0 (node {ray.get_runtime_context().get_node_id()[:12]}): {problem}")
        summary = run_rank(cfg, teacher, prompt_batches=prompt_batches, cond_shapes=config["cond_shapes"],
                           output_dir=config["output"], guard=guard, validation=validation)
    except NonFiniteError as e:
        # Deterministic: every rank stops at the same step (the engine agrees on the skips) and a restart
        # would replay the same steps into the same error. A normal finish ends the attempt without an error;
        # the driver finds this record and stops the run (run_student_group).
        record_failure(config["output"], attempt, rank, e)
        return
    except BaseException as e:
        record_failure(config["output"], attempt, rank, e)
        raise
    if teacher is not None:
        summary["teacher_stats"] = teacher.stats()
    summary["node_id"] = ray.get_runtime_context().get_node_id()  # issue 7: where the rank ran
    summary["scratch"] = scratch_root(cfg)  # issue 11: the node-local dir this rank staged in
    storage.put_bytes(summary_url(config["output"], rank), json.dumps(summary).encode())
    ray.train.report({"steps": summary["steps"]})


def summary_url(output: str, rank: int) -> str:
    from data_pipeline import storage

    return storage.join(output, "rank_summaries", f"rank_{rank}.json")


def absolute_local_paths(cfg: Config) -> Config:
    """A copy of `cfg` with relative local paths made absolute: Ray workers do not run in the driver's working
    directory, so `run.output: runs/x` or a relative `data.shards` would land (or be looked for) elsewhere."""
    import copy

    def fix(value: str, must_exist: bool) -> str:
        if not value or "://" in value or os.path.isabs(value) or (must_exist and not os.path.exists(value)):
            return value
        return os.path.abspath(value)

    cfg = copy.deepcopy(cfg)
    cfg.run.output = fix(cfg.run.output, must_exist=False)
    cfg.model.pretrained = fix(cfg.model.pretrained, must_exist=True)  # a hub id stays as it is
    cfg.model.text_encoder = fix(cfg.model.text_encoder, must_exist=True)
    cfg.data.shards = fix(cfg.data.shards, must_exist=True)  # brace patterns and lists stay as they are
    cfg.cluster.storage_path = fix(cfg.cluster.storage_path, must_exist=False)
    if "$" not in cfg.run.scratch:  # "$VAR/..." expands on each node
        cfg.run.scratch = fix(cfg.run.scratch, must_exist=False)
    return cfg


def cond_shapes_without_prompts(cfg: Config) -> dict[str, list[int]]:
    """Per-sample conditioning shapes of data-free runs without prompt shards, from the teacher transformer's
    config: random prompt embeddings (FLUX, Qwen-Image: short sequences of the joint width, masks all ones,
    Qwen-Image's CFG negative too) or class labels (DiT: drawn per sample, see `synthetic_batches`).
    Runs with `data.shards` get real prompt embeddings instead."""
    from models.families import get_family

    family = get_family(cfg.model.family)
    if cfg.model.family == "dit":
        return {"class_labels": []}
    if cfg.model.family not in ("flux", "qwen_image"):
        raise ValueError(f"model.family={cfg.model.family!r} has no data-free conditioning here: set data.shards")
    if cfg.model.pretrained:
        net_cfg = family.transformer_class.load_config(cfg.model.pretrained, subfolder=cfg.model.subfolder or None)
    else:
        net_cfg = family.tiny_config(cfg)
    T, D = min(cfg.model.max_sequence_length, 16), net_cfg["joint_attention_dim"]
    if cfg.model.family == "qwen_image":
        return {"prompt_embeds": [T, D], "prompt_embeds_mask": [T],
                "negative_prompt_embeds": [T, D], "negative_prompt_embeds_mask": [T]}
    return {"prompt_embeds": [T, D], "pooled_prompt_embeds": [net_cfg["pooled_projection_dim"]]}


def run_student_group(cfg: Config, servers: Optional[list], cond_shapes: Optional[dict[str, list[int]]] = None,
                      output: Optional[str] = None, num_threads: int = 0, feed: Any = None,
                      run_id: str = "", validation: Optional[dict] = None) -> list[dict[str, Any]]:
    """Train under Ray Train; returns the per-rank summaries of the attempt that finished (index = rank).

    `feed`: the BatchFeed actor of the prompt data (`cluster.data_worker.start_data_feed`) when `data.shards`
    is set; otherwise `cond_shapes` sizes the random conditioning of data-free batches. `run_id`: the holder of
    the output's lease (trainer/checkpoint/lease.py); the ranks check it before they write. Restarts: see the module
    docstring."""
    import time

    from data_pipeline import storage as object_storage
    from trainer import fault_injection

    s = cfg.cluster.student
    cfg = absolute_local_paths(cfg)
    if output:
        cfg.run.output = output if object_storage.is_s3(output) else os.path.abspath(output)
    out = cfg.run.output
    loop_config = {"servers": servers or [], "cond_shapes": cond_shapes, "output": out, "num_threads": num_threads,
                   "feed": feed, "run_id": run_id, "validation": validation,
                   "inject_nan_steps": os.environ.get(fault_injection.ENV, "")}
    started = time.time()
    workers, failures, failed_starts, ran = s.workers, 0, 0, False
    while True:
        attempt_started = time.time()
        try:
            _fit(with_workers(cfg, workers), loop_config)
        except Exception as e:  # noqa: BLE001 - classified below; anything that is not Ray Train's is re-raised
            from ray.train import TrainingFailedError

            from cluster.failures import DETERMINISTIC, group_failure

            if not isinstance(e, TrainingFailedError):
                raise
            failure = group_failure(e, _first_failure_quiet(out, attempt_started))
            if failure.kind == DETERMINISTIC:  # issue 21: a restart would fail the same way
                raise StudentGroupFailed(_stopped_message(cfg, failure)) from None
            if failure.startup:
                # Placing the group failed: not a new incident. Before it ever ran, that is what the cluster
                # lacks (the preflight passed, so it changed since, or Ray could not place it); after a failure,
                # the lost node may still have looked alive when the restart was sized.
                failed_starts += 1
                if not ran or failed_starts > 2:
                    raise _start_failed(cfg, failure) from None
            else:
                ran, failed_starts = True, 0
                failures += 1
                if failures > s.max_failures:
                    raise StudentGroupFailed(_failure_message(cfg, e, started)) from None
            workers = _restart_size(cfg, workers, failure)
            continue
        stopped = first_failure(out, attempt_started, of_type="NonFiniteError")
        if stopped is not None:  # the ranks stopped themselves on a deterministic error: not retried (issue 12)
            from cluster.failures import DETERMINISTIC, GroupFailure

            raise StudentGroupFailed(_stopped_message(cfg, GroupFailure(
                DETERMINISTIC, stopped["rank"], stopped["type"], stopped["error"]), nonfinite=True))
        return [json.loads(object_storage.get_bytes(summary_url(out, r))) for r in range(workers)]


def with_workers(cfg: Config, workers: int) -> Config:
    import copy

    if workers == cfg.cluster.student.workers:
        return cfg
    out = copy.deepcopy(cfg)
    out.cluster.student.workers = workers
    return out


def _fit(cfg: Config, loop_config: dict) -> None:
    """One attempt of the group: Ray Train with no retries of its own (the driver decides, see above) and a
    bounded worker-group startup (`cluster.student.startup_timeout_s`; Ray Train's own default retries a
    startup timeout forever)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.capacity import student_bundle
    from data_pipeline import storage as object_storage
    from trainer.scratch import run_scratch

    s = cfg.cluster.student
    use_gpu = s.gpus_per_worker > 0
    out = cfg.run.output
    storage = cfg.cluster.storage_path or (run_scratch(cfg, "ray_train") if object_storage.is_s3(out)
                                           else os.path.join(out, "ray_train"))
    resources = student_bundle(cfg)  # CPU, GPU, memory, custom_resource (issue 7: pins ranks to its nodes)
    resources.setdefault("CPU", 0.0)
    env_key = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # read from the driver's environment when fit() starts
    previous = os.environ.get(env_key)
    os.environ[env_key] = f"{s.startup_timeout_s:g}"
    try:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"cfg": cfg.to_dict(), **loop_config},
            torch_config=TorchConfig(backend=_backend(cfg, use_gpu)),
            scaling_config=ray.train.ScalingConfig(num_workers=s.workers, use_gpu=use_gpu,
                                                   resources_per_worker=resources, placement_strategy="PACK"),
            run_config=ray.train.RunConfig(name=cfg.run.name, storage_path=storage,
                                           failure_config=ray.train.FailureConfig(
                                               max_failures=0, controller_failure_limit=0, max_preemption_failures=0)),
        )
        trainer.fit()
    finally:
        if previous is None:
            os.environ.pop(env_key, None)
        else:
            os.environ[env_key] = previous


def _start_failed(cfg: Config, failure):
    from cluster.capacity import CapacityError, live_nodes, shortfall

    s = cfg.cluster.student
    reason = shortfall(cfg, live_nodes(free=True), students_only=True) or (
        "Ray could not place it although the free resources add up")
    return CapacityError(f"the student group did not start in cluster.student.startup_timeout_s="
                         f"{s.startup_timeout_s:g} s ({failure.describe()}): {reason}")


def _restart_size(cfg: Config, workers: int, failure) -> int:
    """The world size of the next attempt after an infrastructure failure: the recipe's own once the cluster
    holds it again (waiting up to `cluster.student.replacement_wait_s` for a replacement), else the largest
    that fits now (issue 21: a lost node without a replacement), printed."""
    from cluster.capacity import CapacityError, largest_fitting_workers, live_nodes, shortfall, wait_for_students

    s = cfg.cluster.student
    if wait_for_students(cfg, s.workers, s.replacement_wait_s):
        return s.workers
    smaller = largest_fitting_workers(cfg, s.workers - 1)
    if smaller == 0:
        reason = shortfall(with_workers(cfg, 1), live_nodes(free=True), students_only=True) or "no rank fits"
        raise CapacityError(f"the student group lost its resources ({failure.describe()}) and not even one rank "
                            f"fits after cluster.student.replacement_wait_s={s.replacement_wait_s:g} s: {reason}")
    if smaller != workers:
        batch = cfg.train.batch_size
        line = (f"piflow: the cluster lost capacity ({failure.describe()}) and no replacement came in "
                f"cluster.student.replacement_wait_s={s.replacement_wait_s:g} s: continuing on {smaller} of "
                f"{s.workers} student ranks from the newest checkpoint (resharded), global batch kept at "
                f"train.batch_size={batch} ({batch // workers} -> {batch // smaller} per rank)")
        print(line, flush=True)
    return smaller


def _first_failure_quiet(output: str, since: float) -> Optional[dict[str, Any]]:
    try:
        return first_failure(output, since)
    except Exception:  # noqa: BLE001 - the storage itself may be what failed; classify without the records
        return None


def record_failure(output: str, attempt: str, rank: int, error: BaseException) -> None:
    """`<output>/failures/<time>-<attempt>-rank_R.json`: what ended this rank (the run's failure message
    names the first one; a SIGKILLed rank leaves none, its peers then record their lost connection)."""
    import time

    from data_pipeline import storage

    from cluster.failures import kind

    text = str(error).strip().splitlines()[0][:500] if str(error).strip() else ""
    record = {"time": time.time(), "attempt": attempt, "rank": rank, "type": type(error).__name__, "error": text,
              "kind": kind(error)}
    try:
        storage.put_bytes(storage.join(output, "failures", f"{time.time():.6f}-{attempt}-rank_{rank}.json"),
                          json.dumps(record).encode())
    except Exception:  # noqa: BLE001 - never hide the rank's own error behind a failed report of it
        pass


def first_failure(output: str, since: float = 0.0, of_type: str = "") -> Optional[dict[str, Any]]:
    """The earliest failure record under `<output>/failures` written after `since` (of the exception type
    named `of_type` when given); None when there is none."""
    from data_pipeline import storage

    url = storage.join(output, "failures")
    names = sorted(n for n in storage.listdir(url) if n.endswith(".json") and float(n.split("-")[0]) >= since)
    for name in names:
        record = json.loads(storage.get_bytes(storage.join(url, name)))
        if not of_type or record.get("type") == of_type:
            return record
    return None


class StudentGroupFailed(RuntimeError):
    """The student group stopped: a deterministic error, or infrastructure failures beyond
    cluster.student.max_failures restarts."""


def _last_good(cfg: Config, then: str = "run the same command again to resume from it") -> str:
    from trainer.checkpoint.store import latest_valid

    try:
        newest = latest_valid(cfg.run.output)
        return (f"the last good checkpoint is {newest.url} (step {newest.step}); {then}" if newest
                else f"no valid checkpoint under {cfg.run.output}")
    except Exception as e2:  # noqa: BLE001 - the storage itself may be what failed; still report the run's error
        return f"the checkpoints under {cfg.run.output} could not be listed ({e2})"


def _stopped_message(cfg: Config, failure, nonfinite: bool = False) -> str:
    why = ("a non-finite step is deterministic, a restart would replay the same steps into the same error"
           if nonfinite else "a deterministic error: a restart would fail the same way")
    return (f"the student group stopped: {failure.describe()}; not retried ({why}; cluster.student.max_failures="
            f"{cfg.cluster.student.max_failures} is for infrastructure failures); "
            f"{_last_good(cfg, 'resume from it once the cause is fixed')}")


def _failure_message(cfg: Config, error: BaseException, since: float = 0.0) -> str:
    where = _last_good(cfg)
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    first = ""
    try:
        rec = first_failure(cfg.run.output, since)
        if rec is not None:  # issue 12: the crash that started it, not the restarts' follow-up errors
            first = f"; first failure: rank {rec['rank']}: {rec['type']}: {rec['error']}"
    except Exception:  # noqa: BLE001 - as above
        pass
    return (f"the student group failed and cluster.student.max_failures={cfg.cluster.student.max_failures} "
            f"restart(s) did not recover it ({type(error).__name__}: {cause[:500]}){first}; {where}")
