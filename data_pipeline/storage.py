"""Object-storage access for shards, checkpoints and rollouts: the project's only s3fs user.

URLs are `s3://bucket/key` (through s3fs) or local paths (plain or `file://`). The S3 endpoint comes from
`AWS_ENDPOINT_URL` or `PIFLOW_S3_ENDPOINT`; credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`
(+ `AWS_SESSION_TOKEN`) or, when those are unset, the AWS credential chain (profiles, instance roles).
Credentials are never logged or put in messages. Every call retries transient failures (5xx, throttling,
connection resets, timeouts) with exponential backoff; not-found and other 4xx errors fail at once.
Nothing happens at import time: the environment is read when a filesystem is first requested.
"""
from __future__ import annotations

import errno
import logging
import os
import posixpath
import random
import sys
import time
import uuid
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ATTEMPTS = 5
RETRY_BASE_DELAY_S = 0.2
RETRY_MAX_DELAY_S = 10.0

_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN,
                     getattr(errno, "EREMOTEIO", errno.EIO), errno.EIO}
_TRANSIENT_NAMES = {  # botocore / aiohttp / urllib3 exception class names (matched by name: no import needed)
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ServerDisconnectedError", "ClientConnectionError", "ClientOSError", "ClientPayloadError",
    "ResponseStreamingError", "IncompleteReadError", "ProtocolError",
}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}

_webdataset_registered = False


# ------------------------------------------------------------------------------------------ url handling
def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def _local_path(url: str) -> str:
    url = str(url)
    return url[len("file://"):] if url.startswith("file://") else url


def join(url: str, *parts: str) -> str:
    """Join path segments onto a URL (`/` for s3, the OS separator for local paths)."""
    if is_s3(url):
        out = url.rstrip("/")
        for p in parts:
            out = out + "/" + str(p).strip("/")
        return out
    return os.path.join(url, *parts)


def basename(url: str) -> str:
    return posixpath.basename(str(url).rstrip("/")) if is_s3(url) else os.path.basename(str(url).rstrip(os.sep))


def s3_options() -> dict[str, Any]:
    """Keyword arguments for `s3fs.S3FileSystem`, read from the environment now (never at import)."""
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("PIFLOW_S3_ENDPOINT")
    if endpoint:
        opts["endpoint_url"] = endpoint
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        opts["key"], opts["secret"] = key, secret
        if os.environ.get("AWS_SESSION_TOKEN"):
            opts["token"] = os.environ["AWS_SESSION_TOKEN"]
    # else: s3fs/botocore walk the AWS credential chain themselves.
    # No client_kwargs region: bucket creation on S3-compatible servers then fails (STACK.md).
    opts["use_listings_cache"] = False  # checkpoints and shards are listed right after writes
    # issue 12: retrying is this module's policy (`retry`, the shard reader's window); botocore's own
    # retries under s3fs's (5 x 5 attempts) made one call under a throttling store take half a minute
    opts["config_kwargs"] = {"retries": {"total_max_attempts": 2, "mode": "standard"}}
    return opts


def filesystem(url: str):
    """The fsspec filesystem for `url`: s3fs for `s3://`, the local filesystem otherwise."""
    if is_s3(url):
        import s3fs

        # s3fs caches instances by arguments, so repeated calls reuse one client per endpoint/credential set.
        return s3fs.S3FileSystem(**s3_options())
    import fsspec

    return fsspec.filesystem("file")


def round_trip(url: str, name: str) -> None:
    """Create `url` (an S3 bucket if missing / a local dir), then put, list and delete the object `name` under
    it: a preflight check that fails FAST (one attempt, 5 s connect timeout) when the endpoint is unreachable
    or the credentials are refused. Raises with the step that failed as `exc.step`."""
    if is_s3(url):
        import s3fs

        opts = s3_options()  # fail fast: one attempt, short timeouts (the retry policy is for training)
        opts["config_kwargs"] = {**opts.get("config_kwargs", {}), "connect_timeout": 5, "read_timeout": 15,
                                 "retries": {"max_attempts": 1}}
        fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
        fs.retries = 1  # s3fs's own retry loop (5 by default) on top of botocore's
    else:
        fs = filesystem(url)
    path = _fs_path(url).rstrip("/")
    probe = path + "/" + name
    step = "create"
    try:
        if is_s3(url):
            bucket = path.split("/", 1)[0]
            if not fs.exists(bucket):
                fs.mkdir(bucket)
        else:
            os.makedirs(path, exist_ok=True)
        step = "put"
        fs.pipe_file(probe, b"piflow preflight\n")
        step = "list"
        if name not in {posixpath.basename(str(e).rstrip("/")) for e in fs.ls(path, detail=False)}:
            raise OSError(f"{name} was written but is not listed")
        step = "delete"
        fs.rm(probe)
    except Exception as e:
        e.step = step  # type: ignore[attr-defined]
        raise


def _fs_path(url: str) -> str:
    return str(url)[len("s3://"):] if is_s3(url) else _local_path(url)


# ----------------------------------------------------------------------------------------------- retries
def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: 5xx, throttling, connection resets, timeouts. False for 4xx/not-found."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(c, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                          FileExistsError)) for c in chain):
        return False
    for c in chain:  # an HTTP answer decides first: s3fs wraps unknown S3 codes (also 4xx) in OSError(EIO)
        response = getattr(c, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(response.get("Error", {}).get("Code", ""))
            if code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
                return True
            if isinstance(status, int) and 400 <= status < 500:
                return False
    for c in chain:
        if type(c).__name__ in _TRANSIENT_NAMES or isinstance(c, (ConnectionError, TimeoutError)):
            return True
        if isinstance(c, OSError) and c.errno in _TRANSIENT_ERRNOS:
            return True
    return False


_AUTH_NAMES = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "TokenRetrievalError",
               "UnauthorizedSSOTokenError", "SSOTokenLoadError"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
               "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "403"}


class StorageAccessError(PermissionError):
    """Object storage refused us (credentials missing, expired or wrong; no permission): retrying or
    skipping cannot help, the run must stop and say so (issue 12)."""


def is_auth_error(exc: BaseException) -> bool:
    """True for credential / permission failures (never transient, never a bad shard)."""
    e: BaseException | None = exc
    seen: list[BaseException] = []
    while e is not None and all(e is not c for c in seen):
        seen.append(e)
        if isinstance(e, PermissionError) or type(e).__name__ in _AUTH_NAMES:
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict) and str(response.get("Error", {}).get("Code", "")) in _AUTH_CODES:
            return True
        e = e.__cause__ or e.__context__
    return False


def access_error(url: str, exc: BaseException) -> StorageAccessError:
    """A one-line message for an auth failure on `url` (the exception text, never a credential value)."""
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return StorageAccessError(f"{url}: access denied by the object store ({type(exc).__name__}: {detail}); check the "
                              "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, profile or "
                              "instance role: not expired?) and the bucket's permissions")


def retry(fn: Callable[[], T], what: str, attempts: int = RETRY_ATTEMPTS, base_delay: float = RETRY_BASE_DELAY_S,
          transient: Callable[[BaseException], bool] = is_transient) -> T:
    """Call `fn()`; on a transient error wait base_delay * 2^i (with jitter, capped) and try again."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if i == attempts - 1 or not transient(e):
                raise
            delay = min(RETRY_MAX_DELAY_S, base_delay * (2 ** i)) * (0.5 + random.random())
            log.warning("%s: transient error (%s: %s); retry %d/%d in %.2fs",
                        what, type(e).__name__, e, i + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------- file ops
def open_url(url: str, mode: str = "rb"):
    """Open a file object (use as a context manager). Writes to s3 become visible on close."""
    fs = filesystem(url)
    path = _fs_path(url)
    if not is_s3(url) and any(m in mode for m in "wa"):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return retry(lambda: fs.open(path, mode), f"open {url}")


def put_bytes(url: str, data: bytes) -> None:
    """Write `data` to `url`. Local writes are atomic (temp file + rename); an S3 PUT is atomic already."""
    if is_s3(url):
        fs = filesystem(url)
        retry(lambda: fs.pipe_file(_fs_path(url), bytes(data)), f"put {url}")
        return
    path = _local_path(url)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def get_bytes(url: str, attempts: int = RETRY_ATTEMPTS, base_delay: float = RETRY_BASE_DELAY_S) -> bytes:
    fs = filesystem(url)
    return retry(lambda: fs.cat_file(_fs_path(url)), f"get {url}", attempts=attempts, base_delay=base_delay)


class RangeReader:
    """Byte ranges of one object (S3: a ranged GET each, never the whole object) or local file (pread).
    No retries here: the shard reader classifies and retries (data_pipeline/reader.py)."""

    def __init__(self, url: str):
        self.url = url
        self._path = _fs_path(url)
        self._fs = filesystem(url) if is_s3(url) else None
        self._file = None if is_s3(url) else open(self._path, "rb")  # noqa: SIM115 - closed by close()

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end), fewer at the end of the object."""
        if end <= start:
            return b""
        if self._file is not None:
            return os.pread(self._file.fileno(), end - start, start)
        return self._fs.cat_file(self._path, start=start, end=end)

    def size(self) -> int:
        if self._file is not None:
            return os.fstat(self._file.fileno()).st_size
        return int(self._fs.size(self._path))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def upload(local_path: str, url: str) -> None:
    """Copy a local file to `url` (large files: streamed, not held in memory)."""
    if is_s3(url):
        fs = filesystem(url)
        retry(lambda: fs.put_file(local_path, _fs_path(url)), f"upload {url}")
        return
    import shutil

    dst = _local_path(url)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = dst + f".tmp-{uuid.uuid4().hex}"
    shutil.copyfile(local_path, tmp)
    os.replace(tmp, dst)


def download(url: str, local_path: str) -> None:
    fs = filesystem(url)
    os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
    retry(lambda: fs.get_file(_fs_path(url), local_path), f"download {url}")


def upload_dir(local_dir: str, url: str) -> list[str]:
    """Copy every file under `local_dir` to `url` (same relative paths). Returns the relative paths."""
    rels = []
    for dirpath, _, names in sorted(os.walk(local_dir)):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            upload(path, join(url, *rel.split("/")))
            rels.append(rel)
    return rels


def download_dir(url: str, local_dir: str) -> list[str]:
    """Copy every object under the prefix/dir `url` into `local_dir`. Returns the relative paths copied;
    FileNotFoundError when there is nothing under `url`."""
    fs = filesystem(url)
    root = _fs_path(url).rstrip("/")
    files = retry(lambda: fs.find(root), f"list {url}")
    if not files:
        raise FileNotFoundError(f"{url}: nothing to download")
    rels = []
    for f in files:
        rel = str(f)[len(root):].lstrip("/")
        if not rel:
            continue
        download(join(url, *rel.split("/")), os.path.join(local_dir, *rel.split("/")))
        rels.append(rel)
    return rels


def size(url: str) -> int:
    """Size in bytes of the object/file at `url` (S3: one HEAD; FileNotFoundError when missing)."""
    fs = filesystem(url)
    return int(retry(lambda: fs.size(_fs_path(url)), f"size {url}"))


def exists(url: str) -> bool:
    fs = filesystem(url)
    return bool(retry(lambda: fs.exists(_fs_path(url)), f"exists {url}"))


def listdir(url: str) -> list[str]:
    """Sorted names (not paths) directly under `url`; [] when it does not exist."""
    fs = filesystem(url)
    path = _fs_path(url)

    def ls() -> list[str]:
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted({posixpath.basename(str(e).rstrip("/")) for e in entries} - {""})

    return retry(ls, f"list {url}")


def makedirs(url: str) -> None:
    """Create a local directory, or an S3 bucket if the URL names only a bucket that does not exist."""
    fs = filesystem(url)
    path = _fs_path(url)
    if is_s3(url):
        bucket = path.split("/", 1)[0]
        if not retry(lambda: fs.exists(bucket), f"exists s3://{bucket}"):
            retry(lambda: fs.mkdir(bucket), f"create bucket s3://{bucket}")
        return
    os.makedirs(path, exist_ok=True)


def remove(url: str, recursive: bool = False) -> None:
    """Delete a file, or a whole prefix/directory with recursive=True. Missing targets are not an error."""
    fs = filesystem(url)
    path = _fs_path(url)

    def rm() -> None:
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    retry(rm, f"remove {url}")


# ------------------------------------------------------------------------------------------ webdataset
def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
    return open_url(url, mode)


def register_webdataset_s3() -> None:
    """Let `webdataset` open `s3://` URLs through this module (webdataset 1.0.2 has no s3 handler).

    Through `sys.modules`: the attribute `webdataset.gopen` is the function, not the module (STACK.md).
    Idempotent.
    """
    global _webdataset_registered
    if _webdataset_registered:
        return
    import webdataset  # noqa: F401 - makes sure the submodule is loaded

    sys.modules["webdataset.gopen"].gopen_schemes["s3"] = _gopen_s3
    _webdataset_registered = True
