import errno
import os

import pytest

from data_pipeline import storage
from tests.data_pipeline.helpers import new_bucket, prompt_samples, tar_bytes


def _roundtrip(root: str) -> None:
    url = storage.join(root, "a", "b.bin")
    assert not storage.exists(url)
    storage.put_bytes(url, b"hello")
    assert storage.exists(url)
    assert storage.get_bytes(url) == b"hello"
    assert storage.size(url) == 5
    storage.put_bytes(url, b"world")  # overwrite
    assert storage.get_bytes(url) == b"world"
    storage.put_bytes(storage.join(root, "a", "c.bin"), b"x")
    assert storage.listdir(storage.join(root, "a")) == ["b.bin", "c.bin"]
    with storage.open_url(storage.join(root, "a", "d.txt"), "wb") as f:
        f.write(b"streamed")
    with storage.open_url(storage.join(root, "a", "d.txt"), "rb") as f:
        assert f.read() == b"streamed"
    storage.remove(url)
    assert storage.listdir(storage.join(root, "a")) == ["c.bin", "d.txt"]
    storage.remove(storage.join(root, "a"), recursive=True)
    assert storage.listdir(storage.join(root, "a")) == []
    assert storage.listdir(storage.join(root, "missing")) == []
    with pytest.raises(FileNotFoundError):
        storage.get_bytes(storage.join(root, "missing.bin"))
    with pytest.raises(FileNotFoundError):
        storage.size(storage.join(root, "missing.bin"))


def test_local_roundtrip(tmp_path):
    _roundtrip(str(tmp_path))


def test_s3_roundtrip(s3_server):
    _roundtrip(new_bucket() + "/prefix")


def test_local_put_is_atomic_and_leaves_no_temp(tmp_path):
    url = str(tmp_path / "x" / "f.bin")
    storage.put_bytes(url, b"1" * 1000)
    assert os.listdir(tmp_path / "x") == ["f.bin"]


def test_join_and_basename():
    assert storage.join("s3://b/p/", "x", "/y.tar") == "s3://b/p/x/y.tar"
    assert storage.basename("s3://b/p/y.tar") == "y.tar"
    assert storage.join("/tmp/a", "b") == os.path.join("/tmp/a", "b")


def test_s3_options_read_env_at_call_time(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("PIFLOW_S3_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    opts = storage.s3_options()
    assert opts["endpoint_url"] == "http://127.0.0.1:1" and opts["key"] == "k" and opts["secret"] == "s"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    assert storage.s3_options()["endpoint_url"] == "http://127.0.0.1:2"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    assert "key" not in storage.s3_options()  # falls back to the AWS credential chain


def _client_error(status: int, code: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def test_transient_classification():
    assert storage.is_transient(ConnectionResetError(errno.ECONNRESET, "reset"))
    assert storage.is_transient(TimeoutError("timed out"))
    assert storage.is_transient(_client_error(503, "SlowDown"))
    assert storage.is_transient(_client_error(500, "InternalError"))
    assert not storage.is_transient(FileNotFoundError("k"))
    assert not storage.is_transient(_client_error(403, "AccessDenied"))
    # s3fs wraps unknown codes in OSError(EIO) with the ClientError as cause: the HTTP status decides
    wrapped = OSError(errno.EIO, "x")
    wrapped.__cause__ = _client_error(400, "WeirdCode")
    assert not storage.is_transient(wrapped)
    wrapped5 = OSError(errno.EIO, "x")
    wrapped5.__cause__ = _client_error(502, "BadGateway")
    assert storage.is_transient(wrapped5)


def test_retry_retries_transient_then_succeeds_but_not_4xx():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        return "ok"

    assert storage.retry(flaky, "flaky", attempts=5, base_delay=0.001) == "ok"
    assert len(calls) == 3

    missing = []

    def not_found():
        missing.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        storage.retry(not_found, "missing", attempts=5, base_delay=0.001)
    assert len(missing) == 1

    always = []

    def down():
        always.append(1)
        raise TimeoutError("down")

    with pytest.raises(TimeoutError):
        storage.retry(down, "down", attempts=3, base_delay=0.001)
    assert len(always) == 3


def test_webdataset_reads_s3_shard_through_registered_handler(s3_server):
    import webdataset as wds

    storage.register_webdataset_s3()
    storage.register_webdataset_s3()  # idempotent
    url = new_bucket() + "/shard-000000.tar"
    storage.put_bytes(url, tar_bytes(prompt_samples(0, 3)))
    got = [(s["__key__"], s["txt"]) for s in wds.WebDataset(url, shardshuffle=False)]
    assert got == [("k00000", b"prompt 0"), ("k00001", b"prompt 1"), ("k00002", b"prompt 2")]
