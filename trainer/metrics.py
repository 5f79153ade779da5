"""Training metrics: the only module that imports wandb.

Every step goes to `metrics.jsonl` (one JSON object per line, at least `step` and `loss`) under run.output,
a local file or numbered segments on object storage (trainer/record_log.py; with `resume_step`, records after the resumed checkpoint are dropped on open, so a resumed run
never leaves duplicate steps); every `console_every` steps a one-line summary is printed; wandb gets the
same dict when `wandb.mode` is `offline` or `online` (`disabled` never imports it). Only rank 0 logs.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TextIO

from tqdm.auto import tqdm

from trainer.config import Config
from trainer.record_log import RecordLog, read_records, truncate_file

# Keys shown on the console line, in this order, when present.
_CONSOLE_KEYS = ("loss", "grad_norm", "lr", "logstd_mean", "time/step")


def _plain(value: Any) -> Any:
    """Plain scalar: tensors and numpy numbers become Python numbers. Non-finite floats stay floats: the
    console shows `loss nan`, wandb plots the gap, and metrics.jsonl writes `NaN` / `Infinity` (which
    `read_metrics`, Python's json and pandas read back as floats) instead of hiding them as strings."""
    if hasattr(value, "item"):
        value = value.item()
    return value


class MetricsLogger:
    """`output` is run.output, local or `s3://` (`trainer/record_log.py`: on object storage metrics.jsonl is a
    prefix of numbered segments, read back with `read_metrics`). wandb's own files go to node-local scratch
    (`WANDB_DIR`, else `<run.scratch>/piflow-.../wandb`); its run id to `<output>/wandb.json` and checkpoints."""

    def __init__(self, cfg: Config, local_dir: str | Path, rank: int = 0, console_every: int | None = None,
                 stream: TextIO | None = None, run_id: str | None = None, resume_step: int | None = None,
                 guard: Callable[[], None] | None = None):
        from data_pipeline import storage

        self.rank = rank
        self.console_every = cfg.train.log_every if console_every is None else console_every
        self.stream = stream if stream is not None else sys.stdout
        output = str(local_dir)
        self.path: str | Path = (storage.join(output, "metrics.jsonl") if storage.is_s3(output)
                                 else Path(output) / "metrics.jsonl")
        self._log: RecordLog | None = None
        self._wandb_run = None
        if rank != 0:
            return
        self._log = RecordLog(self.path, resume_step=resume_step, flush_steps=cfg.run.log_flush_steps,
                              flush_s=cfg.run.log_flush_s, guard=guard)
        if cfg.wandb.mode != "disabled":
            from trainer.scratch import run_scratch

            wandb_dir = os.environ.get("WANDB_DIR") or run_scratch(cfg, "wandb")
            os.makedirs(wandb_dir, exist_ok=True)
            self._wandb_run = _wandb_init(cfg, wandb_dir, run_id, resume_step)
            storage.put_bytes(storage.join(output, "wandb.json"), json.dumps(
                {"id": self._wandb_run.id, "project": cfg.wandb.project, "mode": cfg.wandb.mode}).encode())

    @property
    def wandb_run_id(self) -> str | None:
        return self._wandb_run.id if self._wandb_run is not None else None

    def log(self, step: int, values: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        self._log.append(record)
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                                step=int(step))
        if self.console_every and step % self.console_every == 0:
            parts = [f"step {step}"]
            for k in _CONSOLE_KEYS:
                if isinstance(record.get(k), (int, float)):
                    parts.append(f"{k} {record[k]:.4g}")
            if record.get("nonfinite_skipped"):
                parts.append(f"nonfinite_skipped {record['nonfinite_skipped']}")
            tqdm.write(" | ".join(parts), file=self.stream)  # keeps an active progress bar intact

    def log_image(self, step: int, key: str, png: bytes) -> None:
        """A PNG (e.g. a validation rollout's preview grid, trainer/evaluation/rollouts.py) to wandb as an image.
        metrics.jsonl holds numbers only: the PNG itself lives under run.output/rollouts/."""
        if self.rank != 0 or self._wandb_run is None:
            return
        import io

        import wandb
        from PIL import Image

        image = Image.open(io.BytesIO(png))
        self._wandb_run.log({key: wandb.Image(image)}, step=int(step))

    def flush(self) -> None:
        """Put the buffered records on storage (called before every checkpoint: the log then covers it;
        trainer/record_log.py)."""
        if self._log is not None:
            self._log.flush()

    def log_images(self, step: int, key: str, pngs: list[bytes], captions: list[str]) -> None:
        """Several PNGs under one key, each with its caption (validation samples with their prompts)."""
        if self.rank != 0 or self._wandb_run is None:
            return
        import io

        import wandb
        from PIL import Image

        images = [wandb.Image(Image.open(io.BytesIO(png)), caption=c) for png, c in zip(pngs, captions)]
        self._wandb_run.log({key: images}, step=int(step))

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wandb_credentials_problem(cfg: Config) -> str | None:
    """Issue 21: None unless `wandb.mode: online` and this process has no usable W&B credentials, found the way
    wandb.init finds them (WANDB_API_KEY or WANDB_IDENTITY_TOKEN_FILE, else the netrc entry of WANDB_BASE_URL's
    host); else the one-line reason. Local only, no request to the server, and never the key itself. The driver
    checks before anything starts and rank 0 before it loads a model (its node may lack what the driver has)."""
    if cfg.wandb.mode != "online":
        return None
    from wandb.errors import AuthenticationError
    from wandb.sdk.lib.wbauth import read_netrc_auth
    from wandb.sdk.lib.wbauth.validation import check_api_key

    base = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    fix = "or set wandb.mode=offline (then `wandb sync` the run later)"
    token_file = os.environ.get("WANDB_IDENTITY_TOKEN_FILE", "")
    if token_file:
        return None if os.path.isfile(token_file) else (
            f"wandb.mode=online: WANDB_IDENTITY_TOKEN_FILE={token_file} does not exist on this node; {fix}")
    key, source = os.environ.get("WANDB_API_KEY", "").strip(), "WANDB_API_KEY"
    if not key:
        try:
            key, source = read_netrc_auth(host=base) or "", f"the netrc entry for {base}"
        except (AuthenticationError, ValueError) as e:
            return f"wandb.mode=online: the netrc entry for {base} is not a W&B API key ({e}); {fix}"
    if not key:
        return (f"wandb.mode=online but this node has no W&B credentials for {base}: set WANDB_API_KEY in its "
                f"environment (a Kubernetes Secret, the SLURM job's environment) or run `wandb login` there, {fix}")
    problem = check_api_key(key)
    return f"wandb.mode=online: {source} is not a W&B API key ({problem}); {fix}" if problem else None


def _wandb_init(cfg: Config, directory: str, run_id: str | None, resume_step: int | None):
    """A new wandb run, or the checkpoint's run rewound to the resumed step (issue 12): `resume_from=
    "<id>?_step=<step>"` (wandb >= 0.17.1) truncates the run's history there, so the steps logged again
    after a resume are kept. With plain resume="allow", wandb drops every `log(step=...)` below the run's
    last step: the re-logged steps would vanish. A server that refuses rewinding (a preview feature on
    wandb.ai) falls back to resume="allow" with a warning saying what is lost."""
    import wandb

    common = dict(project=cfg.wandb.project, name=cfg.run.name, mode=cfg.wandb.mode, dir=directory,
                  config=cfg.to_dict())
    if not run_id:
        return wandb.init(**common)
    if resume_step is not None:
        try:
            return wandb.init(**common, resume_from=f"{run_id}?_step={int(resume_step)}")
        except Exception as e:  # noqa: BLE001 - a metrics backend must not stop training
            import logging

            logging.getLogger(__name__).warning(
                "wandb refused to rewind run %s to step %d (%s); resuming it instead: wandb drops the steps "
                "after %d that were logged before the restart (metrics.jsonl keeps every step)",
                run_id, resume_step, str(e).splitlines()[0][:200] if str(e) else type(e).__name__, resume_step)
    return wandb.init(**common, id=run_id, resume="allow")


def truncate_records(path: str | Path, last_step: int) -> int:
    """Keep only the records of a local JSON-lines file with step <= `last_step` (a run resumed from the
    checkpoint of `last_step` logs the later steps again). Returns how many records were dropped."""
    return truncate_file(path, last_step)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics log: a local metrics.jsonl file, or its segments on object storage (`s3://`)
    read back as one stream (a line that is not JSON raises, naming the file or segment and line)."""
    return read_records(path)


# ------------------------------------------------------------------ startup timing (issue 7)
# Per phase (Ray up, teacher load, student init, first step), printed as each phase ends so a slow start shows
# where it stalls, and summarised at the end of the run. The launcher (cluster/launch.py) times the Ray and
# teacher phases, each student rank (trainer/rank_program.py) its own.
PHASES = ("ray_up", "teacher_load", "student_init", "first_step")  # the order they happen in


class PhaseTimes:
    """Seconds per startup phase; `print_each` writes one `piflow: startup <phase> <s> s` line per phase."""

    def __init__(self, print_each: bool = True, out: Optional[TextIO] = None):
        self.seconds: dict[str, float] = {}
        self.print_each = print_each
        self.out = out

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = float(seconds)
        if self.print_each:
            print(f"piflow: startup {name} {seconds:.2f} s", file=self.out or sys.stdout, flush=True)

    def merge_max(self, per_rank: list[dict[str, float]]) -> None:
        """Fold in the ranks' phases; the slowest rank is the one everybody waits for."""
        for name in {k for r in per_rank for k in r}:
            self.seconds[name] = max(float(r[name]) for r in per_rank if name in r)

    def format(self) -> str:
        names = [p for p in PHASES if p in self.seconds] + [p for p in self.seconds if p not in PHASES]
        parts = [f"{n} {self.seconds[n]:.2f} s" for n in names]
        return "startup: " + " | ".join(parts) + f" (total {sum(self.seconds.values()):.2f} s)"


class FirstStepClock:
    """Wraps a batch iterator: the second `next()` marks the end of the first training step (the loop asks
    for step 2's batch right after step 1's optimizer step). Other attributes (state_dict, ...) pass through."""

    def __init__(self, batches: Any, times: PhaseTimes, name: str = "first_step"):
        self._batches, self._times, self._name = batches, times, name
        self._calls = 0
        self._t0 = time.perf_counter()

    def __iter__(self) -> "FirstStepClock":
        return self

    def __next__(self) -> Any:
        self._calls += 1
        if self._calls == 2:
            self.finish()
        return next(self._batches)

    def finish(self) -> None:
        """Record the phase now if it is not recorded yet (a one-step run never asks for a second batch)."""
        if self._name not in self._times.seconds and self._calls >= 1:
            self._times.add(self._name, time.perf_counter() - self._t0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batches, name)
