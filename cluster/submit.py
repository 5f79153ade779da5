"""Submit a run to a running Ray cluster through the Ray Jobs API, and follow, query or stop it.

    piflow submit CONFIG --address http://HEAD:8265 [key.sub=value ...]   # packages the working dir, streams logs
    piflow status [JOB] --address ...                                     # one job, or the list
    piflow stop JOB --address ...

What travels: the working directory (default: the current one) zipped by Ray, minus `DEFAULT_EXCLUDES`
(virtualenvs, .git, run outputs, caches, wandb), the run's own local output dir and, always and last (so no
`--exclude '!.env'` re-includes them), `SECRET_EXCLUDES` (.env*, keys, cloud and git credentials); the job runs
`python -m cluster.cli train CONFIG [overrides] cluster.address=auto` on the head with the uploaded code first
on `sys.path`, so the cluster runs exactly the submitted checkout. The config is validated HERE first, so a bad
key fails before anything is uploaded.

Authentication (Ray 2.60 turns token auth on by default): the token is sent as an `Authorization: Bearer`
header, read from `RAY_AUTH_TOKEN`, else the file at `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token` (Ray's
own order); `RAY_AUTH_MODE=disabled` sends none. The token is never printed, logged or put into the job's
runtime env; credentials of any kind are refused in `--env` (runtime envs are visible in the dashboard):
the nodes take them from their own environment.
"""
from __future__ import annotations

import asyncio
import datetime
import os
import re
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

# gitignore-style patterns (Ray's `excludes`), relative to the working dir. Ray also honours .gitignore files.
DEFAULT_EXCLUDES = (
    ".venv", "venv", ".git", "/runs", "wandb", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", "*.egg-info", ".ipynb_checkpoints", "node_modules", ".cache",
)
# Files that hold credentials: never uploaded, whatever --exclude says (they go LAST: in gitignore rules the last
# matching pattern wins, so an earlier negation cannot re-include them). `id_*` are SSH keys (id_rsa, id_ed25519).
SECRET_EXCLUDES = (
    ".env*", "*.pem", "*.key", ".aws/", ".netrc", "_netrc", "id_*", ".git-credentials", ".ssh/", ".pypirc", "*.p12",
)
# Environment names never shipped in a runtime env: they would be readable from the dashboard.
_SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE)", re.I)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """A submission that cannot go ahead (bad address, auth, paths); the message says what to change."""


# ---------------------------------------------------------------------------------------------- auth
def auth_token(environ: Optional[dict[str, str]] = None) -> Optional[str]:
    """The cluster token (Ray's order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), or None.
    None as well under RAY_AUTH_MODE=disabled. Raises if RAY_AUTH_MODE=token and no token is found."""
    env = os.environ if environ is None else environ
    mode = env.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        return None
    token = env.get("RAY_AUTH_TOKEN", "").strip()
    if not token and env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file ({e.strerror})") from None
    if not token:
        default = Path(env.get("HOME", str(Path.home()))) / ".ray" / "auth_token"
        if default.is_file():
            token = default.read_text().strip()
    if not token and mode == "token":
        raise SubmitError("RAY_AUTH_MODE=token but no token found: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to "
                          "a file holding it (the cluster's ~/.ray/auth_token)")
    return token or None


def auth_headers(environ: Optional[dict[str, str]] = None) -> dict[str, str]:
    token = auth_token(environ)
    return {"Authorization": f"Bearer {token}"} if token else {}


def dashboard_address(address: Optional[str], environ: Optional[dict[str, str]] = None) -> str:
    """`--address`, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS when they are http(s) URLs."""
    env = os.environ if environ is None else environ
    for candidate in (address, env.get("RAY_API_SERVER_ADDRESS"), env.get("RAY_ADDRESS")):
        if candidate:
            if not re.match(r"^https?://", candidate):
                if candidate is address:
                    raise SubmitError(f"--address {candidate!r}: expected the dashboard's http://HOST:PORT "
                                      f"(port 8265 by default), not the GCS address")
                continue
            return candidate.rstrip("/")
    raise SubmitError("no cluster address: pass --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")


def make_client(address: Optional[str]):
    """A JobSubmissionClient with the token header; auth and connection failures become SubmitError."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address)
    headers = auth_headers()
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError:
        have = "the token sent was rejected" if headers else "no token was sent"
        raise SubmitError(f"{url}: the cluster requires token authentication and {have}; set RAY_AUTH_TOKEN "
                          f"(or RAY_AUTH_TOKEN_PATH) to the cluster's token") from None
    except ConnectionError as e:
        raise SubmitError(f"{url}: cannot reach the Ray dashboard ({e}); is the head up and the port right?") from None


# --------------------------------------------------------------------------------------------- submit
@dataclass
class SubmitRequest:
    config: str  # path of the YAML config (inside working_dir)
    overrides: list[str] = field(default_factory=list)
    working_dir: str = "."
    excludes: list[str] = field(default_factory=list)  # added to DEFAULT_EXCLUDES
    env: dict[str, str] = field(default_factory=dict)  # non-secret env vars for the job
    job_id: str = ""  # "" = <run.name>-<UTC time>-<4 hex>
    force: bool = False  # `piflow train --force` on the cluster
    entrypoint_num_cpus: float = 0.0  # the driver only orchestrates; the groups reserve their own resources
    python: str = "python"  # the interpreter on the cluster's nodes


def relative_config(config: str, working_dir: str) -> str:
    """The config's path relative to the working dir (it travels inside the package)."""
    wd, path = Path(working_dir).resolve(), Path(config).resolve()
    if not path.is_file():
        raise SubmitError(f"{config}: no such config file")
    try:
        return path.relative_to(wd).as_posix()
    except ValueError:
        raise SubmitError(f"{config}: the config must be inside the working dir {wd} (it is uploaded with it); "
                          f"move it there or pass --working-dir") from None


def excludes_for(req: SubmitRequest, run_output: str) -> list[str]:
    """DEFAULT_EXCLUDES + the run's local output dir when it lies in the working dir + the request's own +
    SECRET_EXCLUDES (last)."""
    out = list(DEFAULT_EXCLUDES)
    if "://" not in run_output:
        wd, target = Path(req.working_dir).resolve(), (Path(req.working_dir) / run_output).resolve()
        if target != wd and wd in target.parents:
            out.append("/" + target.relative_to(wd).as_posix())
    out += [e for e in req.excludes if e not in out]
    return out + list(SECRET_EXCLUDES)


def job_env(env: dict[str, str]) -> dict[str, str]:
    bad = sorted(k for k in env if _SECRET_NAME.search(k))
    if bad:
        raise SubmitError(f"--env {', '.join(bad)}: credentials are not shipped in the job's runtime env (it is "
                          f"readable from the dashboard); give them to the nodes' environment or the AWS chain")
    return {"PYTHONUNBUFFERED": "1", **env}


def entrypoint(req: SubmitRequest, config_rel: str) -> str:
    args = [req.python, "-m", "cluster.cli", "train", config_rel, *req.overrides, "cluster.address=auto"]
    if req.force:
        args.append("--force")
    return shlex.join(args)


def default_job_id(run_name: str) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name).strip("-") or "piflow"
    return f"{safe}-{stamp}-{secrets.token_hex(2)}"


def build_submission(req: SubmitRequest) -> dict[str, Any]:
    """Validate the config locally and build the submit_job keyword arguments (no network)."""
    from trainer.config import load_config

    config_rel = relative_config(req.config, req.working_dir)
    cfg = load_config(req.config, [*req.overrides, "cluster.address=auto"])  # ConfigError before any upload
    from cluster.preflight import check_output_url

    check_output_url(cfg.run.output)  # the scheme here; the rest of the preflight runs in the job (its credentials)
    runtime_env = {"working_dir": str(Path(req.working_dir).resolve()),
                   "excludes": excludes_for(req, cfg.run.output), "env_vars": job_env(req.env)}
    return {"entrypoint": entrypoint(req, config_rel), "runtime_env": runtime_env,
            "submission_id": req.job_id or default_job_id(cfg.run.name),
            "metadata": {"piflow_config": config_rel, "run_name": cfg.run.name, "run_output": cfg.run.output},
            "entrypoint_num_cpus": req.entrypoint_num_cpus}


def submit(req: SubmitRequest, address: Optional[str]) -> str:
    """Submit; returns the job id."""
    kwargs = build_submission(req)
    client = make_client(address)
    try:
        return client.submit_job(**kwargs)
    except RuntimeError as e:  # e.g. the job id exists already, or the package is too large to upload
        raise SubmitError(f"the cluster refused the submission: {e}") from None


# ------------------------------------------------------------------------------------------ follow / stop
def stream_logs(address: Optional[str], job_id: str, out: TextIO = sys.stdout) -> str:
    """Print the job's logs as they come until it ends; returns its final status name."""
    client = make_client(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the log stream broke (head restarted, network): the job itself may go on
        print(f"piflow: lost the log stream of {job_id} ({e}); waiting for its status", file=sys.stderr)
        return wait_terminal(client, job_id, timeout_s=float("inf"), poll_s=5.0)
    return wait_terminal(client, job_id, timeout_s=60.0)


def wait_terminal(client, job_id: str, timeout_s: float, poll_s: float = 0.5) -> str:
    """Poll until the job is SUCCEEDED / FAILED / STOPPED (the log stream can close just before)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def job_info(address: Optional[str], job_id: str) -> dict[str, Any]:
    client = make_client(address)
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as e:
        raise SubmitError(f"job {job_id}: not found on the cluster ({e})") from None
    return {"job_id": info.submission_id or job_id, "status": str(info.status.value), "message": info.message or "",
            "entrypoint": info.entrypoint, "start_time": info.start_time, "end_time": info.end_time,
            "metadata": dict(info.metadata or {})}


def list_jobs(address: Optional[str]) -> list[dict[str, Any]]:
    client = make_client(address)
    return [{"job_id": j.submission_id, "status": str(j.status.value), "run_name": (j.metadata or {}).get("run_name", ""),
             "start_time": j.start_time} for j in client.list_jobs() if j.submission_id]


def stop(address: Optional[str], job_id: str, timeout_s: float = 60.0) -> str:
    """Ask the job to stop (SIGTERM, then SIGKILL after Ray's grace period); returns the status reached."""
    client = make_client(address)
    try:
        client.stop_job(job_id)
    except RuntimeError as e:
        raise SubmitError(f"job {job_id}: cannot stop ({e})") from None
    return wait_terminal(client, job_id, timeout_s)


def format_info(info: dict[str, Any]) -> str:
    def when(ms: Optional[int]) -> str:
        if not ms:
            return "-"
        return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    lines = [f"job {info['job_id']}: {info['status']}", f"  entrypoint: {info['entrypoint']}",
             f"  started: {when(info['start_time'])}  ended: {when(info['end_time'])}"]
    if info["message"]:
        lines.append(f"  message: {info['message']}")
    if info["metadata"].get("run_output"):
        lines.append(f"  run.output: {info['metadata']['run_output']}")
    return "\n".join(lines)
