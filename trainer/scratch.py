"""Node-local scratch (`run.scratch`, default: the system temp dir): checkpoint staging, wandb files, the hub
cache, Ray Train's local dir. Nothing here is shared: another node never reads it, and a node that is replaced
loses it; what must survive lives under `run.output` (object storage)."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

from trainer.config import Config


class ScratchSpaceError(OSError):
    """Not enough free space under run.scratch for what is about to be staged there."""


def scratch_root(cfg: Config) -> str:
    """run.scratch with environment variables expanded ON THIS NODE (`$SLURM_TMPDIR`, `$LOCAL_DISK/piflow`: one
    config, a different disk per node), or the node's system temp dir (TMPDIR) when empty."""
    return os.path.abspath(os.path.expandvars(cfg.run.scratch) or tempfile.gettempdir())


def run_scratch(cfg: Config, *parts: str) -> str:
    """`<scratch>/piflow-<run key>/<parts>`: one directory per run (key = hash of run.output), so two runs on
    one node never share staging or wandb files."""
    key = hashlib.sha256(cfg.run.output.encode()).hexdigest()[:12]
    return os.path.join(scratch_root(cfg), f"piflow-{cfg.run.name}-{key}", *parts)


def ensure_free(path: str, needed: int, what: str,
                fix: str = "free space or set run.scratch to a larger node-local disk") -> None:
    """Raise ScratchSpaceError (one line: what, the bytes, the path, `fix`) unless the filesystem holding `path`
    has `needed` bytes free."""
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ScratchSpaceError(f"run.scratch: {what} needs {needed} bytes ({needed / 1e9:.2f} GB) under {path}, "
                                f"only {free} ({free / 1e9:.2f} GB) are free there; {fix}")
