"""`piflow rehearse RECIPE`: the production recipe end to end on this machine before spending GPU hours.

The recipe runs as written except for the one fixed shrink table (trainer/rehearsal/shrink.py, docs/rehearse.md);
its `model.pretrained` hub id resolves to a tiny model of the same family in a temporary hub cache
(HF_HUB_CACHE, HF_HUB_OFFLINE=1; a local directory becomes the tiny model's directory). Every step is the
`piflow` command a user would type, run in a subprocess with the rehearsal's environment:

1. storage: `--output`, or a temporary S3 server (moto on 127.0.0.1) for the run and its data;
2. data: `piflow shards build` (+ `piflow shards encode` for a pre-encoded recipe, with the tiny text encoders);
   a data-based recipe (DiT ImageNet) gets image shards and `piflow shards latents` with the tiny VAE;
3. `piflow train` on 2 ranks; once the first checkpoint is valid and a later step is logged, one rank is
   SIGKILLed; Ray Train restarts the group, which resumes from the checkpoint; the re-done steps must repeat the
   killed attempt's losses (resume exact);
4. `piflow export` and `piflow sample`;
5. one table: every changed key (recipe -> rehearsal), losses finite, resume exact, step time, and the
   recipe's full-scale `piflow plan` (trainer/planner/memory.py) on the node shape it states.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from trainer.config import Config, ConfigError
from trainer.rehearsal.report import Report, format_table, full_scale_plan

MARKER = ".piflow-rehearsal"  # a workdir holding it may be cleared by the next rehearsal
PROMPTS = ["a photo of a red fox in the snow", "a watercolor painting of a lighthouse at dawn", "a small blue dog",
           "a red cat on a green chair", "a drawing of a large house", "a handwritten seven", "two cats and a dog",
           "a painting of the sea at night", "a photo of a city street in the rain", "a green apple on a table",
           "a picture of a mountain lake", "a blue car in front of a shop", "a bowl of soup", "an old bicycle",
           "a bird on a branch", "a cup of coffee and a book"]
IMAGES = 16  # data-based recipes: synthetic image samples (2 shards of 8), standing in for the user's images


class RehearsalFailed(RuntimeError):
    """A rehearsal step failed: the message names the step, its one-line error and its log."""


# ------------------------------------------------------------------------------------------------ storage
class LocalS3:
    """moto's S3 server on 127.0.0.1 (a free port) with throwaway credentials in this process's environment
    (subprocesses inherit them); the previous values come back on exit."""

    KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")

    def __enter__(self) -> "LocalS3":
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise ConfigError("piflow rehearse: without --output it runs a local S3 server (moto); install it with "
                              "pip install 'piflow[rehearse]', or pass --output DIR|s3://BUCKET/PREFIX") from None
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self._saved = {k: os.environ.get(k) for k in self.KEYS}
        for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
            os.environ.pop(k, None)
        os.environ.update(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID="rehearsal",
                          AWS_SECRET_ACCESS_KEY="rehearsal")
        return self

    def __exit__(self, *exc) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.server.stop()


# ------------------------------------------------------------------------------------------- subprocesses
class Steps:
    """Runs `piflow` commands as subprocesses in the rehearsal's environment, each logged to the workdir."""

    def __init__(self, workdir: Path, env: dict[str, str], echo: bool = True):
        self.workdir, self.env, self.echo = workdir, env, echo
        self.seconds: dict[str, float] = {}
        self.commands: list[str] = []

    def popen(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / "logs" / f"{len(self.commands):02d}-{name.replace(' ', '-')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.commands.append("piflow " + " ".join(args))
        if self.echo:
            print(f"piflow rehearse: $ piflow {' '.join(args)}", flush=True)
        f = open(log, "w")
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=self.env, start_new_session=True)
        f.close()
        return proc, log

    def wait(self, name: str, proc: subprocess.Popen, log: Path, started: float, timeout: float) -> None:
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_tree(proc.pid)
            raise RehearsalFailed(f"step '{name}' did not finish in {timeout:.0f} s (stopped); log: {log}") from None
        except KeyboardInterrupt:  # its own session gets no Ctrl-C: stop it and its Ray here
            stop_tree(proc.pid)
            raise
        self.seconds[name] = round(time.time() - started, 1)
        if rc != 0:
            raise RehearsalFailed(f"step '{name}' failed (exit {rc}): {last_error(log)}; log: {log}")

    def run(self, name: str, args: list[str], timeout: float = 1800.0) -> None:
        started = time.time()
        proc, log = self.popen(name, args)
        self.wait(name, proc, log, started, timeout)


def last_error(log: Path) -> str:
    """The command's one-line error (`piflow ...: ...`), else its last non-empty line."""
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
    for line in reversed(lines):
        if line.startswith("piflow"):
            return line[:500]
    return lines[-1][:500] if lines else "(no output)"


def descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def stop_tree(pid: int) -> None:
    """SIGKILL a subprocess this rehearsal started and every process it started (Ray's included)."""
    import psutil

    for p in [*descendants(pid), psutil.Process(pid)] if psutil.pid_exists(pid) else []:
        try:
            p.kill()
        except psutil.Error:
            pass


# ------------------------------------------------------------------------------------------ kill a rank
class RankKiller(threading.Thread):
    """Watches the run on storage; once a checkpoint at or after `first_ckpt` is valid and a later step is
    logged, keeps the killed attempt's records and SIGKILLs one Ray Train worker of the train subprocess."""

    def __init__(self, output: str, first_ckpt: int, train_pid: int, poll_s: float = 0.25):
        super().__init__(daemon=True, name="rehearsal-killer")
        self.output, self.first_ckpt, self.train_pid, self.poll_s = output, first_ckpt, train_pid, poll_s
        self.records: list[dict[str, Any]] = []
        self.killed_pid = 0
        self.checkpoint = 0
        self.error = ""
        self._halt = threading.Event()

    def _ready(self) -> bool:
        from data_pipeline import storage
        from trainer.checkpoint.store import latest_valid
        from trainer.metrics import read_metrics

        try:
            records = read_metrics(storage.join(self.output, "metrics.jsonl"))
        except (FileNotFoundError, ValueError):
            return False  # not written yet, or a segment half-written: next poll
        newest = max((int(r.get("step", 0)) for r in records), default=0)
        if newest <= self.first_ckpt:
            return False
        ckpt = latest_valid(self.output)
        if ckpt is None or ckpt.step < self.first_ckpt or newest <= ckpt.step:
            return False
        self.records, self.checkpoint = records, ckpt.step
        return True

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                if self._ready():
                    workers = [p for p in descendants(self.train_pid)
                               if (p.cmdline() or [""])[0].startswith("ray::RayTrainWorker")]
                    if workers:
                        workers[-1].send_signal(signal.SIGKILL)
                        self.killed_pid = workers[-1].pid
                        return
            except Exception as e:  # noqa: BLE001 - a storage hiccup: try again; the report says if no kill came
                self.error = f"{type(e).__name__}: {e}"
            self._halt.wait(self.poll_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


# ------------------------------------------------------------------------------------------------ data
def _write_prompts(path: Path, cfg: Config) -> None:
    prompts = list(dict.fromkeys([*cfg.eval.prompts, *PROMPTS]))[:len(PROMPTS)]
    path.write_text("\n".join(prompts) + "\n")


def _write_image_shards(url: str, cfg: Config) -> None:
    """Class-labelled images (KEY.png + KEY.cls) as ImageNet's image shards are, synthetic: smooth colour
    fields of the latent resolution x 8 (the VAE's compression)."""
    import io

    import numpy as np
    from PIL import Image

    from data_pipeline import storage
    from data_pipeline.shards import tar_bytes

    size = cfg.model.latent_size * 8
    rng = np.random.default_rng(cfg.run.seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    storage.makedirs(url)
    per = IMAGES // 2
    for shard in range(2):
        samples = []
        for i in range(per):
            label = int(rng.integers(cfg.model.num_classes))
            a, b, c = rng.uniform(0, 1, 3)
            img = np.stack([a * xx + (1 - a) * yy, b * (1 - xx), c * yy], -1)
            buf = io.BytesIO()
            Image.fromarray((img * 255).astype(np.uint8)).save(buf, format="PNG")
            samples.append({"__key__": f"img{shard:02d}{i:04d}", "png": buf.getvalue(), "cls": str(label).encode()})
        storage.put_bytes(storage.join(url, f"images-{shard:06d}.tar"), tar_bytes(samples))


def build_data(runner: Steps, cfg: Config, config_file: Path, data_root: str, shards_url: str) -> None:
    """The shards a user would make for this recipe, with the rehearsal's config (tiny encoders / VAE)."""
    from data_pipeline import storage

    if not cfg.distill.data_free:  # data-based: image shards -> latent shards with the family's VAE
        images = storage.join(data_root, "images")
        _write_image_shards(images, cfg)
        runner.run("shards latents", ["shards", "latents", images, "--out", shards_url, "--config", str(config_file),
                                     "--image-size", str(cfg.model.latent_size * 8), "--flip", "random"])
        return
    prompts_txt = runner.workdir / "prompts.txt"
    _write_prompts(prompts_txt, cfg)
    built = storage.join(data_root, "prompts") if cfg.data.pre_encoded else shards_url
    runner.run("shards build", ["shards", "build", str(prompts_txt), "--out", built, "--per-shard",
                               str(len(PROMPTS) // 2)])
    if cfg.data.pre_encoded:
        runner.run("shards encode", ["shards", "encode", built, "--out", shards_url, "--config", str(config_file)])


# ------------------------------------------------------------------------------------------------ train
def train_with_kill(runner: Steps, cfg: Config, config_file: Path, report: Report, timeout: float) -> None:
    from data_pipeline import storage
    from trainer.metrics import read_metrics

    started = time.time()
    proc, log = runner.popen("train", ["train", str(config_file)])
    killer = RankKiller(cfg.run.output, cfg.train.ckpt_every, proc.pid)
    killer.start()
    try:
        runner.wait("train", proc, log, started, timeout)
    finally:
        killer.stop()
    records = read_metrics(storage.join(cfg.run.output, "metrics.jsonl"))
    report.losses = {int(r["step"]): float(r["loss"]) for r in records if "loss" in r}
    times = [float(r["time/step"]) for r in records if "time/step" in r and int(r["step"]) > 1]
    report.step_time_s = round(statistics.median(times), 3) if times else 0.0
    summary = json.loads(storage.get_bytes(storage.join(cfg.run.output, "rank_summaries", "rank_0.json")))
    start = int(summary.get("start_step", 0))
    killed = {int(r["step"]): float(r["loss"]) for r in killer.records if "loss" in r}
    report.killed = {"pid": killer.killed_pid, "after_step": max(killed, default=0), "checkpoint": killer.checkpoint,
                     "error": killer.error}
    redone = sorted(s for s in killed if s > start)
    diffs = {s: abs(report.losses.get(s, math.nan) - killed[s]) / max(abs(killed[s]), 1e-30) for s in redone}
    exact = bool(killer.killed_pid) and start > 0 and bool(redone) and all(d <= 1e-6 for d in diffs.values())
    report.resume = {"exact": exact, "resumed_from_step": start, "resumed_from": summary.get("resumed_from", ""),
                     "redone_steps": redone, "max_rel_diff": max(diffs.values(), default=math.nan),
                     "killed_losses": {str(s): killed[s] for s in redone},
                     "resumed_losses": {str(s): report.losses.get(s) for s in redone}}
    if not killer.killed_pid:
        raise RehearsalFailed(f"no rank was killed: the run finished before a step after the first checkpoint was "
                              f"seen on storage ({killer.error or 'raise --steps'}); log: {log}")


def export_and_sample(runner: Steps, cfg: Config, report: Report) -> None:
    import torch

    export = runner.workdir / "export"
    runner.run("export", ["export", cfg.run.output, "--out", str(export)])
    video = cfg.model.latent_frames > 1
    out = runner.workdir / ("sample.gif" if video else "sample.png")
    prompts = cfg.eval.prompts[:2] or ["a photo"]
    args = ["sample", str(export), "--out", str(out)]
    for p in prompts:
        args += ["--prompt", p]
    runner.run("sample", args)
    latents = torch.load(out.with_suffix(".pt"), weights_only=True)
    report.sample = {"file": str(out), "shape": list(latents.shape), "finite": bool(torch.isfinite(latents).all()),
                     "std": float(latents.float().std()), "nfe": cfg.distill.nfe}


# ------------------------------------------------------------------------------------------------ main
def _workdir(path: Path) -> Path:
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).exists():
            raise ConfigError(f"--workdir {path}: exists and is not a rehearsal's directory; give an empty or new "
                              f"directory")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("written by piflow rehearse; the next rehearsal may clear it\n")
    return path


def _machine_line(machine) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    kind = f"{machine.gpus} GPU(s)" if machine.gpus else f"{machine.cpus} CPU cores"
    return f"{kind}, load average {load:.1f} at the start"


def rehearse(recipe: str, overrides: list[str], steps: int = 6, output: str = "", workdir: str = "",
             timeout: float = 1800.0) -> Report:
    """The whole rehearsal; returns its report (printed by the command). Raises RehearsalFailed on a failed step;
    a bad recipe, override, --steps or --output fails before anything is written or deleted."""
    import contextlib

    from trainer.config import dump_config, load_config
    from trainer.rehearsal.shrink import Context, Machine, shrink
    from trainer.rehearsal.snapshot import write_hub_snapshot, write_model_dir
    from trainer.weights import is_hub_id

    t0 = time.time()
    base = load_config(recipe)
    machine = Machine.here()
    work = Path(workdir or Path("runs") / "rehearse" / base.run.name).resolve()
    root = output.rstrip("/") if output else "s3://piflow-rehearsal"
    run_output, data_root = f"{root}/runs/{base.run.name}", f"{root}/data/{base.run.name}"
    kind = "latents" if not base.distill.data_free else "encoded" if base.data.pre_encoded else "prompts"
    ctx = Context(machine, steps, run_output, f"{data_root}/{kind}", pretrained_dir=str(work / "model"))
    recipe_cfg, cfg, changes = shrink(recipe, ctx, overrides)  # every config error comes here, first
    report = Report(recipe=recipe, machine={**vars(machine), "describe": _machine_line(machine)})
    report.changes = [{"key": c.key, "recipe": c.recipe, "rehearsal": c.rehearsal, "kind": c.kind,
                       "family": cfg.model.family} for c in changes]
    with contextlib.ExitStack() as stack:
        if not output:
            stack.enter_context(LocalS3())
        _check_empty(run_output)
        _workdir(work)
        env = {**os.environ, "HF_HUB_CACHE": str(work / "hub"), "HF_HUB_OFFLINE": "1", "WANDB_DIR": str(work),
               "WANDB_MODE": cfg.wandb.mode}  # the recipe's (offline) mode, whatever the caller's environment says
        env.setdefault("OMP_NUM_THREADS", str(max(1, machine.cpus // 2)))
        try:
            report.plan = full_scale_plan(recipe_cfg)
            if is_hub_id(cfg.model.pretrained):
                write_hub_snapshot(cfg, work / "hub")
            else:
                write_model_dir(cfg, cfg.model.pretrained)
            config_file = work / "rehearsal.yaml"
            config_file.write_text(f"# piflow rehearse {recipe}: the recipe with the shrink of docs/rehearse.md\n"
                                   + dump_config(cfg))
            runner = Steps(work, env)
            report.seconds["setup"] = round(time.time() - t0, 1)
            t = time.time()
            build_data(runner, cfg, config_file, data_root, ctx.shards)
            report.seconds["data"] = round(time.time() - t, 1)
            train_with_kill(runner, cfg, config_file, report, timeout)
            report.seconds["train"] = runner.seconds["train"]
            t = time.time()
            export_and_sample(runner, cfg, report)
            report.seconds["export+sample"] = round(time.time() - t, 1)
            report.passed = report.finite and report.resume.get("exact", False) and report.sample.get("finite", False)
        finally:
            report.seconds["total"] = round(time.time() - t0, 1)
            (work / "rehearsal.json").write_text(json.dumps(report.to_dict(), indent=1, default=str))
    return report


def _check_empty(run_output: str) -> None:
    from data_pipeline import storage

    if storage.exists(storage.join(run_output, "checkpoints")):
        raise ConfigError(f"--output: {run_output} already holds checkpoints; a rehearsal starts fresh and deletes "
                          f"nothing: give an empty prefix")


def add_rehearse(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rehearse", help="run a production recipe end to end on this machine (shrunk by one fixed "
                                        "table): shards, 2-rank training, a killed rank and its exact resume, export, "
                                        "sample, and the full-scale plan")
    p.add_argument("recipe", help="the production recipe (YAML), e.g. configs/flux_dev_gm_k8_4nfe.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides on top of the shrink (listed as such)")
    p.add_argument("--steps", type=int, default=6, help="training steps (>= 4): a checkpoint at steps/2, a rank "
                   "killed in the step after it, the group resumed from the checkpoint")
    p.add_argument("--output", default="", help="storage for the run and its shards: a local dir or s3://BUCKET/"
                   "PREFIX with your credentials (default: a temporary S3 server on 127.0.0.1)")
    p.add_argument("--workdir", default="", help="local dir for the tiny model, logs, the export and the sample "
                   "(default runs/rehearse/<run.name>; cleared when it holds an earlier rehearsal)")
    p.add_argument("--json", default="", help="also write the report as JSON here")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds the training step may take")

    def run(args: argparse.Namespace) -> int:
        try:
            report = rehearse(args.recipe, list(args.overrides), args.steps, args.output, args.workdir, args.timeout)
        except RehearsalFailed as e:
            print(f"piflow rehearse: {e}", file=sys.stderr)
            return 1
        print(format_table(report), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report.to_dict(), indent=1, default=str))
        return 0 if report.passed else 1

    p.set_defaults(func=run)
