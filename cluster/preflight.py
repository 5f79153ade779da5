"""Driver checks before a run deletes anything (`--force`) or starts Ray (issue 11), in this order: the config,
the output URL's scheme, one list/put/delete round trip on the output with the configured credentials, the
prompt shard list (brace patterns expanded, every shard listed), the teacher weights (a hub id resolvable or
a directory present, its architecture readable), W&B credentials when wandb.mode is online. The resume world
size needs no check: checkpoints reshard.
Each failure is one line naming the key, the value and what to do (`PreflightError`, a ConfigError: the CLI prints it as one line)."""
from __future__ import annotations

import json
import re
import uuid
from collections import defaultdict

from data_pipeline import storage
from trainer.config import Config, ConfigError, validate

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


class PreflightError(ConfigError):
    """A run that cannot start: the message names the key, the value and the fix."""


def preflight(cfg: Config, config_path: str | None = None) -> None:
    validate(cfg, config_path or "<config>")
    check_output_url(cfg.run.output)
    check_output_roundtrip(cfg.run.output)
    if cfg.data.shards:
        check_shards(cfg.data.shards)
    check_teacher(cfg)
    check_wandb(cfg)


def check_wandb(cfg: Config) -> None:
    """wandb.mode=online needs credentials here (issue 21: a node without them failed after loading the model,
    three times); rank 0 checks its own node again before it builds anything (cluster/student_group.py)."""
    from trainer.metrics import wandb_credentials_problem

    problem = wandb_credentials_problem(cfg)
    if problem:
        raise PreflightError(problem)


def check_output_url(url: str) -> None:
    if not url.strip():
        raise PreflightError("run.output='': set it to s3://BUCKET/PREFIX or a local directory")
    if url.startswith("s3://"):
        bucket = url[len("s3://"):].split("/", 1)[0]
        if not _BUCKET.match(bucket):
            raise PreflightError(f"run.output={url!r}: {bucket!r} is not a valid S3 bucket name (3-63 lowercase "
                                 f"letters, digits, dots, hyphens); write s3://BUCKET/PREFIX")
        return
    if url.startswith("file://"):
        return
    m = _SCHEME.match(url)
    if m and len(m.group(1)) > 1:  # one letter would be a Windows drive
        scheme = m.group(1)
        hint = ("did you mean s3://? " if scheme.lower() in ("s3", "s3a", "s3n") else "")
        raise PreflightError(f"run.output={url!r}: storage scheme '{scheme}:' is not supported; {hint}use "
                             f"s3://BUCKET/PREFIX (S3 or an S3-compatible endpoint through AWS_ENDPOINT_URL) or a "
                             f"local directory")


def check_output_roundtrip(url: str) -> None:
    """Create the output (bucket) if needed, then put, list and delete one small object there."""
    try:
        storage.round_trip(url, f".piflow-preflight-{uuid.uuid4().hex[:12]}")
    except Exception as e:  # noqa: BLE001 - reported as one line; botocore messages hold no secrets
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise PreflightError(
            f"run.output={url!r}: the storage round trip failed at '{getattr(e, 'step', '?')}' ({type(e).__name__}: "
            f"{cause}); check that the bucket/directory is writable with this environment's credentials "
            f"(AWS_ACCESS_KEY_ID/AWS_PROFILE/instance role) and endpoint (AWS_ENDPOINT_URL)") from None


def check_shards(spec: str) -> None:
    """Expand the shard list and make sure every shard is there (one listing per parent prefix)."""
    from data_pipeline.shards import resolve_shards

    try:
        urls = resolve_shards(spec)
    except Exception as e:  # noqa: BLE001
        raise PreflightError(f"data.shards={spec!r}: {e}; point it at a dir/prefix of .tar shards, a brace "
                             f"pattern or a comma-separated list") from None
    by_parent: dict[str, list[str]] = defaultdict(list)
    for u in urls:
        parent, _, name = u.rstrip("/").rpartition("/")
        by_parent[parent or "."].append(name)
    for parent, names in by_parent.items():
        try:
            present = set(storage.listdir(parent))
        except Exception as e:  # noqa: BLE001
            raise PreflightError(f"data.shards={spec!r}: cannot list {parent} ({type(e).__name__}: {e}); check the "
                                 f"URL and the credentials") from None
        missing = [n for n in names if n not in present]
        if missing:
            raise PreflightError(f"data.shards={spec!r}: {len(missing)} of {len(urls)} shards do not exist (first: "
                                 f"{parent}/{missing[0]}); fix the pattern or build them with `piflow shards build`")


def check_teacher(cfg: Config) -> None:
    """model.pretrained: a hub id that resolves (trainer/weights.py), or a local / s3:// diffusers-format dir
    whose `<subfolder>/config.json` names the architecture."""
    from trainer.weights import resolve_config_file

    ref = cfg.model.pretrained
    if not ref:
        if not cfg.model.tiny and cfg.model.family not in ("toy2d",):
            raise PreflightError(f"model.pretrained='': {cfg.model.family} needs the teacher's weights; set it to a "
                                 f"hub id or a diffusers-format directory (or model.tiny=true for a tiny test model)")
        return
    config_file = resolve_config_file(cfg)  # PreflightError-style ConfigError on a hub id that does not resolve
    try:
        meta = json.loads(storage.get_bytes(config_file).decode("utf-8"))
        arch = meta.get("_class_name") or meta.get("architectures")
    except FileNotFoundError:
        raise PreflightError(f"model.pretrained={ref!r}: {config_file} does not exist; point it at a diffusers-format "
                             f"directory with {cfg.model.subfolder or '.'}/config.json (model.subfolder="
                             f"{cfg.model.subfolder!r}) or a hub id") from None
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise PreflightError(f"model.pretrained={ref!r}: cannot read {config_file} ({type(e).__name__}: {e}); the "
                             f"teacher's architecture must be readable") from None
    if not arch:
        raise PreflightError(f"model.pretrained={ref!r}: {config_file} names no architecture (_class_name); is it "
                             f"a diffusers-format model?")
