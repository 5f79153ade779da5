"""Training metrics: the only module that imports wandb.

Every step goes to `metrics.jsonl` (one JSON object per line, at least `step` and `loss`) in a local
directory (with `resume_step`, records after the resumed checkpoint are dropped on open, so a resumed run
never leaves duplicate steps); every `console_every` steps a one-line summary is printed; wandb gets the
same dict when `wandb.mode` is `offline` or `online` (`disabled` never imports it). Only rank 0 logs.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm

from trainer.config import Config

# Keys shown on the console line, in this order, when present.
_CONSOLE_KEYS = ("loss", "grad_norm", "lr", "logstd_mean", "time/step")


def _plain(value: Any) -> Any:
    """JSON-safe scalar: tensors and numpy numbers become floats, non-finite floats stay as strings."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    def __init__(self, cfg: Config, local_dir: str | Path, rank: int = 0, console_every: int | None = None,
                 stream: TextIO | None = None, run_id: str | None = None, resume_step: int | None = None):
        self.rank = rank
        self.console_every = cfg.train.log_every if console_every is None else console_every
        self.stream = stream if stream is not None else sys.stdout
        self.path = Path(local_dir) / "metrics.jsonl"
        self._file = None
        self._wandb_run = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_records(self.path, resume_step)
        self._file = self.path.open("a")
        if cfg.wandb.mode != "disabled":
            import wandb

            # resume="allow" with a fixed id continues the same wandb run after a checkpoint resume.
            self._wandb_run = wandb.init(
                project=cfg.wandb.project, name=cfg.run.name, mode=cfg.wandb.mode, dir=str(self.path.parent),
                config=cfg.to_dict(), id=run_id, resume="allow" if run_id else None,
            )

    @property
    def wandb_run_id(self) -> str | None:
        return self._wandb_run.id if self._wandb_run is not None else None

    def log(self, step: int, values: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                                step=int(step))
        if self.console_every and step % self.console_every == 0:
            parts = [f"step {step}"]
            for k in _CONSOLE_KEYS:
                if isinstance(record.get(k), (int, float)):
                    parts.append(f"{k} {record[k]:.4g}")
            tqdm.write(" | ".join(parts), file=self.stream)  # keeps an active progress bar intact

    def log_image(self, step: int, key: str, png: bytes) -> None:
        """A PNG (e.g. a validation rollout's preview grid, trainer/rollouts.py) to wandb as an image.
        metrics.jsonl holds numbers only: the PNG itself lives under run.output/rollouts/."""
        if self.rank != 0 or self._wandb_run is None:
            return
        import io

        import wandb
        from PIL import Image

        image = Image.open(io.BytesIO(png))
        self._wandb_run.log({key: wandb.Image(image)}, step=int(step))

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
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def truncate_records(path: str | Path, last_step: int) -> int:
    """Keep only the records of a JSON-lines file with step <= `last_step` (a run resumed from the checkpoint
    of `last_step` logs the later steps again; without this they would appear twice). Atomic rewrite; a
    partial last line (a killed writer) is dropped too. Returns how many records were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (a line that is not JSON raises, naming the file and line)."""
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON record ({e})") from None
    return records
