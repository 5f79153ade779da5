"""Chaos soak (issue 12): a distributed digits run that is killed again and again must end exactly where an
uninterrupted run ends.

    .venv/bin/python benchmarks/chaos.py [--steps 300 --ckpt-every 20]   # the full soak: 8 faults
    .venv/bin/python benchmarks/chaos.py --short         # what `make test` runs (tests/cluster/test_chaos.py)

The run: configs/digits_demo.yaml through `piflow train` (embedded Ray, 2 ZeRO-3 student ranks under Ray Train,
a TeacherServer actor, a DataWorker encoding prompt shards, a BatchFeed), its prompt shards AND its run.output
(checkpoints, metrics and data-key log segments, failure records) on the moto S3 server behind a
fault-injecting proxy on 127.0.0.1 (tests/s3_fault_proxy.py: 503 / 500 answers, dropped connections and slow
answers at a few percent of requests). A chaos driver SIGKILLs, at seeded random steps, a student rank, the
TeacherServer, the DataWorker, the BatchFeed and the whole `piflow train` session (then runs the same command
again), one of the driver kills while a checkpoint is being uploaded. One teacher batch is poisoned with NaN
(trainer/fault_injection.py, PIFLOW_INJECT_NAN_TEACHER_STEPS: keyed by the step, so a restart that replays
that step meets the NaN again), in the reference run and the chaos run alike.

Bars: the run finishes; every step's loss equals an uninterrupted run's (same store, no faults, the same NaN
step) within 1e-5, except the NaN step, which both runs log as NaN and skip (`nonfinite_skipped` becomes 1
there and nowhere else); the sample keys each rank consumed equal the uninterrupted run's (none lost, none
repeated); every checkpoint that has a MANIFEST.json verifies (sha256 of every file), checked after every
fault and at the end. Everything is read back from run.output on the store, as a user would. Recovery time
per fault = from the kill until the run logs a step past the one it was at (the runs write one log segment
per step, `run.log_flush_steps=1`, so the driver sees each step as it is logged).

OUTPUT_ON_S3 = False puts run.output in a local dir under --out instead (to look at the files).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUTPUT_ON_S3 = True  # run.output on the faulty store too (False: a local dir, e.g. to look at the files)
POLL_S = 0.2 if OUTPUT_ON_S3 else 0.05  # how often the driver looks at the run's progress (S3: 2 requests a look)
FAULT_RATES = {"503": 0.01, "500": 0.01, "reset": 0.01, "slow": 0.01}  # per request, through the proxy
# Process titles Ray gives the actors / workers (matched by prefix, only inside the run's own session).
TITLES = {"student_rank": "ray::RayTrainWorker", "teacher": "ray::TeacherServer", "data_worker": "ray::DataWorker",
          "feed": "ray::BatchFeed"}
FULL_KINDS = ["student_rank", "teacher", "data_worker", "feed", "driver", "student_rank", "driver_in_upload",
              "teacher"]
SHORT_KINDS = ["student_rank", "feed", "driver_in_upload"]
# One injected NaN teacher batch (trainer/fault_injection.py, keyed by the step): the reference and the chaos
# run both get it, and both skip that step by the non-finite guard (a restart replays it into the same skip).
NAN_ENV = "PIFLOW_INJECT_NAN_TEACHER_STEPS"


@dataclass
class Fault:
    kind: str
    at_step: int
    killed_at_step: int = -1
    pid: int = 0
    in_upload: Optional[bool] = None  # driver_in_upload: a checkpoint was seen mid-write right before the kill
    recovery_s: float = float("nan")


@dataclass
class Soak:
    root: Path
    steps: int
    ckpt_every: int
    batch_size: int
    kinds: list
    seed: int = 0
    faults: list = field(default_factory=list)
    nan_step: int = 0  # the step whose teacher answers are NaN (in both runs)


# ----------------------------------------------------------------------------------------------- store
def start_store(seed: int):
    """moto on loopback, a fault proxy in front; the environment points every process at the proxy."""
    from moto.server import ThreadedMotoServer

    from tests.s3_fault_proxy import FaultProxy

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    host, port = moto.get_host_and_port()
    proxy = FaultProxy(f"http://{host}:{port}", seed=seed, slow_s=0.5).start()
    saved = dict(os.environ)
    os.environ.update({"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_ACCESS_KEY_ID": "chaos",  # moto takes any
                       "AWS_SECRET_ACCESS_KEY": "chaos"})
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    return moto, proxy, saved


def build_shards(bucket: str, repeats: int) -> str:
    import tempfile

    from data_pipeline import storage
    from data_pipeline.digits import digit_prompts
    from data_pipeline.shards import build_shards as build

    storage.makedirs(bucket)
    url = f"{bucket}/shards"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "prompts.txt"
        # numbered prompts: every sample key and text is unique, so lost / repeated samples show
        src.write_text("\n".join(f"{p} #{i}" for i, p in enumerate(digit_prompts(repeats))) + "\n")
        build(str(src), url, per_shard=40, progress=False)
    return url


def write_config(path: Path, output: str, shards: str, soak: Soak, max_failures: int) -> None:
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "digits_demo.yaml").read_text())
    # one log segment per step on object storage: the chaos driver sees each step as it is logged
    cfg["run"].update(name=path.stem, output=output, log_flush_steps=1)
    cfg["model"]["pretrained"] = str(ROOT / "assets" / "teachers" / "digits")
    cfg["train"].update(iters=soak.steps, batch_size=soak.batch_size, ckpt_every=soak.ckpt_every, log_every=10,
                        ckpt_keep_last=3)
    cfg["eval"]["every"] = 0
    cfg["wandb"]["mode"] = "disabled"
    cfg["data"].update(shards=shards, timeout_s=120.0, retry_window_s=120.0)
    cfg["teacher"].update(timeout_s=120.0, max_restarts=20)
    cfg["cluster"]["student"]["max_failures"] = max_failures
    path.write_text(yaml.safe_dump(cfg))


# ---------------------------------------------------------------------------------------------- driver
def _cmd0(p) -> str:
    import psutil

    try:
        return (p.cmdline() or [""])[0]
    except (ProcessLookupError, PermissionError, psutil.Error):
        return ""


class Driver:
    """`piflow train CONFIG` in its own process session (so a kill takes its embedded Ray with it)."""

    def __init__(self, config: Path, log: Path, nan_step: int = 0):
        self.config, self.log, self.nan_step = config, log, nan_step
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
               "PYTHONPATH": str(ROOT),
               "RAY_raylet_start_wait_time_s": "180"}  # a loaded shared machine: Ray's 60 s is not enough
        if self.nan_step:
            env[NAN_ENV] = str(self.nan_step)  # the launcher forwards it to the student ranks
        with open(self.log, "a") as log:
            log.write(f"\n===== start {self.starts}\n")
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "train", str(self.config)], cwd=str(ROOT),
                                     env=env, stdout=open(self.log, "a"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.starts += 1

    def pids(self, title: str) -> list[int]:
        """Processes titled `title*` of this driver: in its session, or below it in the process tree (a Ray
        worker that left the session still descends from the driver's raylet)."""
        return sorted(p.pid for p in self._procs() if _cmd0(p).startswith(title))

    def titles(self) -> list[str]:
        """The `ray::` process titles of this driver (for an error that says what was there instead)."""
        return sorted({_cmd0(p) for p in self._procs() if _cmd0(p).startswith("ray::")})

    def _procs(self) -> list:
        import psutil

        found = {}
        try:
            found.update((c.pid, c) for c in psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.Error:
            pass
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) == self.proc.pid:
                    found[p.pid] = p
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return list(found.values())

    def kill_session(self) -> None:
        from tests.cluster.loopback_ray import _kill_sessions

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        _kill_sessions([self.proc.pid])

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_session()
            raise RuntimeError(f"piflow train did not finish in {timeout:.0f} s; log: {self.log}")


# --------------------------------------------------------------------------------------------- checks
# Everything is read from run.output through data_pipeline.storage (a local dir or s3://), as a user would.
def last_step(output: str) -> int:
    """The newest step in the run's metrics log (0 before the first): on object storage the newest segment."""
    from data_pipeline import storage
    from trainer.record_log import segments

    url = storage.join(output, "metrics.jsonl")
    try:
        if storage.is_s3(url):
            found = segments(url)
            text = storage.get_bytes(found[-1][1]).decode() if found else ""
        else:
            text = Path(url).read_text() if Path(url).exists() else ""
    except FileNotFoundError:  # a resume just dropped that segment
        return 0
    step = 0
    for line in text.splitlines():
        try:
            step = max(step, int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            continue
    return step


def metrics(output: str) -> dict[int, dict]:
    """step -> the record rank 0 logged (the resumed timeline: records after a resume point are replaced)."""
    from data_pipeline import storage
    from trainer.metrics import read_metrics

    records = read_metrics(storage.join(output, "metrics.jsonl"))
    steps = [r["step"] for r in records]
    if len(steps) != len(set(steps)):
        raise AssertionError(f"{output}/metrics.jsonl: a step logged twice")
    return {r["step"]: r for r in records}


def consumed(output: str, world: int = 2) -> dict[int, list[str]]:
    from data_pipeline import storage
    from trainer.metrics import read_metrics

    per_rank = []
    for r in range(world):
        steps: dict[int, list[str]] = {}
        for rec in read_metrics(storage.join(output, "data_keys", f"rank_{r}.jsonl")):
            if rec["step"] in steps:
                raise AssertionError(f"rank {r} logged the keys of step {rec['step']} twice")
            steps[rec["step"]] = rec["keys"]
        per_rank.append(steps)
    return {s: [k for group in zip(*(p[s] for p in per_rank)) for k in group] for s in per_rank[0]}


def corrupted_checkpoints(output: str) -> list[str]:
    """Every checkpoint with a MANIFEST.json whose files do not all match it (sha256); [] when all verify."""
    from data_pipeline import storage
    from trainer.checkpoint.store import checkpoints_url, list_steps, read_manifest, step_dirname, verify

    bad = []
    for step in list_steps(output):
        url = storage.join(checkpoints_url(output), step_dirname(step))
        try:
            manifest = read_manifest(url)
        except Exception as e:  # noqa: BLE001 - a manifest that cannot be read is corruption too
            bad.append(f"{url}: {e}")
            continue
        if manifest is not None:
            problem = verify(url, manifest, "sha256")
            if problem:  # retention may have been deleting it while we read: only a checkpoint still there counts
                time.sleep(1.0)
                if step in list_steps(output) and read_manifest(url) is not None:
                    problem = verify(url, manifest, "sha256")
            if problem:
                bad.append(f"{url}: {problem}")
    return bad


def checkpoint_in_progress(output: str) -> bool:
    """Whether the newest checkpoint directory has files but no MANIFEST.json yet (its upload is under way)."""
    from data_pipeline import storage
    from trainer.checkpoint.store import MANIFEST, checkpoints_url, list_steps, step_dirname

    steps = list_steps(output)
    return bool(steps) and not storage.exists(storage.join(checkpoints_url(output), step_dirname(steps[-1]),
                                                           MANIFEST))


# ------------------------------------------------------------------------------------------------ soak
def plan(soak: Soak) -> list[Fault]:
    """Seeded fault steps spread over the run, >= 4 steps apart, and the NaN teacher step (`soak.nan_step`).
    The short version's are fixed: a student rank before the first checkpoint (the group restarts fresh: the
    feed must rewind to the start), the NaN step between the first and the second checkpoint (the driver's
    kill replays it from the first), the driver during the second checkpoint's write, the feed after it."""
    if soak.kinds == SHORT_KINDS:
        e = soak.ckpt_every
        soak.nan_step = e + e // 4
        return [Fault("student_rank", e // 2), Fault("driver_in_upload", 2 * e - 1), Fault("feed", 2 * e + e // 2)]
    rng = random.Random(soak.seed)
    lo, hi = max(2, soak.ckpt_every // 2), soak.steps - 4
    span = (hi - lo) / len(soak.kinds)
    steps = [int(lo + i * span + rng.uniform(0, max(span - 4, 0))) for i in range(len(soak.kinds))]
    kinds = list(soak.kinds)
    rng.shuffle(kinds)
    soak.nan_step = rng.randint(lo, hi)
    return [Fault(k, s) for k, s in zip(kinds, steps)]


def run_chaos(soak: Soak, driver: Driver, output: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    driver.start()
    for fault in soak.faults:
        while last_step(output) < fault.at_step:  # wait for the planned step (and for the last recovery)
            if driver.proc.poll() is not None:
                raise RuntimeError(f"piflow train exited ({driver.proc.returncode}) before the fault at step "
                                   f"{fault.at_step}; log: {driver.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"soak timed out waiting for step {fault.at_step}; log: {driver.log}")
            time.sleep(POLL_S)
        if fault.kind == "driver_in_upload":
            wait_until = time.monotonic() + 120  # until a checkpoint is being written (parts, no manifest)
            fault.in_upload = False
            while time.monotonic() < wait_until:
                if checkpoint_in_progress(output):
                    # kill at once: a second look would race the upload (a tiny checkpoint on S3 is written in
                    # well under a second) and could report a kill that did land mid-write as not
                    fault.in_upload = True
                    break
                time.sleep(0.005 if not OUTPUT_ON_S3 else 0.0)  # on S3 each look is two requests already
        t_kill = time.monotonic()
        if fault.kind.startswith("driver"):
            fault.pid = driver.proc.pid
            driver.kill_session()
            # read after the kill: a step logged between the last look and the kill counts as done
            fault.killed_at_step = last_step(output)
            driver.start()  # the same command again: it resumes from the newest valid checkpoint
        else:
            pids = []
            while not pids and time.monotonic() < t_kill + 120:  # a restarting actor has no process for a while
                pids = driver.pids(TITLES[fault.kind])
                time.sleep(0.05)
            if not pids:
                raise RuntimeError(f"no {TITLES[fault.kind]} process to kill at step {last_step(output)} after 120 s "
                                   f"(the driver's Ray processes: {driver.titles()}); log: {driver.log}")
            fault.pid = random.Random(soak.seed + fault.at_step).choice(pids)
            fault.killed_at_step = last_step(output)
            try:
                os.kill(fault.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            t_kill = time.monotonic()
        bad = corrupted_checkpoints(output)
        if bad:
            raise AssertionError(f"corrupted checkpoint after the {fault.kind} kill: {bad[0]}")
        while last_step(output) <= fault.killed_at_step and driver.proc.poll() is None:
            time.sleep(POLL_S)
        if driver.proc.poll() is None or last_step(output) > fault.killed_at_step:
            fault.recovery_s = time.monotonic() - t_kill
        print(f"chaos: killed {fault.kind} (pid {fault.pid}) at step {fault.killed_at_step}"
              + (f", checkpoint mid-write: {fault.in_upload}" if fault.in_upload is not None else "")
              + f"; recovered in {fault.recovery_s:.1f} s", flush=True)
    rc = driver.wait(max(60.0, deadline - time.monotonic()))
    if rc != 0:
        raise RuntimeError(f"piflow train exited with {rc} after the faults; log: {driver.log}")


def run_soak(root: Path, steps: int, kinds: list[str], seed: int = 0, ckpt_every: int = 20, batch_size: int = 16,
             timeout: float = 3600.0) -> dict:
    """Reference run, then the chaos run; returns the report (bars, faults, recovery statistics)."""
    import uuid

    root.mkdir(parents=True, exist_ok=True)
    soak = Soak(root, steps, ckpt_every, batch_size, kinds, seed)
    soak.faults = plan(soak)
    moto, proxy, saved_env = start_store(seed)
    t0 = time.monotonic()
    try:
        bucket = f"s3://chaos-{uuid.uuid4().hex[:10]}"
        shards = build_shards(bucket, repeats=max(4, steps * batch_size // 30))  # ~3 epochs of 10 digits
        outputs = {}
        for name in ("reference", "chaos"):
            outputs[name] = f"{bucket}/{name}" if OUTPUT_ON_S3 else str(root / name)
            restarts = sum(k == "student_rank" for k in kinds) + 2
            write_config(root / f"{name}.yaml", outputs[name], shards, soak, max_failures=restarts)
        proxy.rates = {}  # the reference: the same store, no faults
        ref = Driver(root / "reference.yaml", root / "reference.log", soak.nan_step)
        ref.start()
        if ref.wait(timeout) != 0:
            raise RuntimeError(f"the reference run failed; log: {ref.log}")
        t_ref = time.monotonic() - t0
        proxy.rates = dict(FAULT_RATES)
        driver = Driver(root / "chaos.yaml", root / "chaos.log", soak.nan_step)
        run_chaos(soak, driver, outputs["chaos"], timeout)
        t_chaos = time.monotonic() - t0 - t_ref
        proxy.rates = {}  # the checks read back what the runs wrote, from the same store
        requests, injected = proxy.requests, dict(proxy.counts)
        report = check(soak, outputs["reference"], outputs["chaos"])
    finally:
        proxy.rates = {}
        proxy.stop()
        moto.stop()
        os.environ.clear()
        os.environ.update(saved_env)
    rec = [f.recovery_s for f in soak.faults if f.recovery_s == f.recovery_s]
    return {
        "steps": steps, "batch_size": batch_size, "ckpt_every": ckpt_every, "seed": seed, "nan_step": soak.nan_step,
        "faults": [f.__dict__ for f in soak.faults],
        "s3_requests": requests, "s3_faults_injected": injected,
        **{k: report.pop(k) for k in ("max_loss_diff", "missing_steps", "unexpected_steps", "steps_with_other_keys")},
        "recovery_median_s": statistics.median(rec) if rec else float("nan"),
        "recovery_max_s": max(rec) if rec else float("nan"),
        "reference_s": t_ref, "chaos_s": t_chaos, "driver_starts": driver.starts,
        "output_on_s3": OUTPUT_ON_S3,
        "bars": {**report,
                 "killed_during_checkpoint_write": all(f.in_upload for f in soak.faults
                                                       if f.kind == "driver_in_upload")},
    }


def check(soak: Soak, ref_output: str, output: str) -> dict:
    """The bars that compare the chaos run with the reference, read back from run.output (local or s3://),
    plus "max_loss_diff". The NaN step's loss is NaN in both runs: it is compared by the skip, not the value."""
    ref, got = metrics(ref_output), metrics(output)
    diffs = {s: abs(got[s]["loss"] - ref[s]["loss"]) for s in ref if s in got and s != soak.nan_step}

    def skipped_once(m: dict[int, dict]) -> bool:  # NaN at the injected step, skipped there and nowhere else
        n = soak.nan_step
        return (n in m and math.isnan(m[n]["loss"]) and m[n]["nonfinite_skipped"] == 1
                and all(r["nonfinite_skipped"] == (1 if s >= n else 0) for s, r in m.items()))

    keys, ref_keys = consumed(output), consumed(ref_output)
    return {
        "max_loss_diff": max(diffs.values()) if diffs else float("nan"),
        # what differs, so a failed bar says where (not bars themselves)
        "missing_steps": sorted(set(range(1, soak.steps + 1)) - set(got)),
        "unexpected_steps": sorted(set(got) - set(range(1, soak.steps + 1))),
        "steps_with_other_keys": sorted(s for s in set(keys) | set(ref_keys) if keys.get(s) != ref_keys.get(s)),
        "finished": sorted(got) == list(range(1, soak.steps + 1)),
        "losses_within_1e-5": sorted(ref) == sorted(got) and all(d <= 1e-5 for d in diffs.values()),
        "nan_step_skipped_in_both": skipped_once(ref) and skipped_once(got),
        "same_sample_keys": keys == ref_keys,
        "no_corrupted_checkpoint": not corrupted_checkpoints(output),
    }


def format_report(r: dict) -> str:
    lines = ["| fault | step | recovery (s) |", "|---|---:|---:|"]
    for f in r["faults"]:
        note = " (checkpoint mid-write)" if f["in_upload"] else ""
        lines.append(f"| {f['kind']}{note} | {f['killed_at_step']} | {f['recovery_s']:.1f} |")
    lines.append(f"| nan_teacher (injected, skipped in both runs) | {r['nan_step']} | - |")
    lines.append(f"\nrecovery: median {r['recovery_median_s']:.1f} s, max {r['recovery_max_s']:.1f} s; "
                 f"max |loss - reference| {r['max_loss_diff']:.2e}; S3 requests {r['s3_requests']}, injected faults "
                 f"{r['s3_faults_injected']}; reference run {r['reference_s']:.0f} s, chaos run {r['chaos_s']:.0f} s")
    lines.append("bars: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in r["bars"].items()))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="the make-test version: 3 faults, 60 steps")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/chaos")
    a = p.parse_args(argv)
    steps, kinds, every = (60, SHORT_KINDS, 20) if a.short else (a.steps, FULL_KINDS, a.ckpt_every)
    report = run_soak(Path(a.out).resolve(), steps, kinds, a.seed, ckpt_every=every)
    print(format_report(report))
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / ("chaos_short.json" if a.short else f"chaos_{steps}.json")).write_text(json.dumps(report, indent=1))
    return 0 if all(report["bars"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
