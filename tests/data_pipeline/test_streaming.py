"""Shards streamed sample by sample (issue 22): the same keys in the same order as the whole-shard reader
(a golden sequence recorded from it), whether a shard is fetched whole or indexed from its headers and read one
sample per ranged request, in one piece or many; the cursor resumes mid-shard exactly; a shard is never
fetched whole in ranged mode; damage is found by the index before any sample of the shard is used, and a shard
cut while it is being read reports the rest as skipped, by name."""
from __future__ import annotations

import json
import os

import pytest
import torch

from data_pipeline import reader as reader_mod
from data_pipeline import storage, tar_index
from data_pipeline.order import ShardTask
from data_pipeline.reader import ReadOptions, ShardReader
from data_pipeline.records import BadRecord, PromptRecord
from data_pipeline.stream import PromptStream
from tests.data_pipeline import stream_data
from tests.data_pipeline.helpers import new_bucket, prompt_samples, tar_bytes

# Recorded with the whole-shard reader (commit 388e1f3) on stream_data.write(...), seed 11, batches of 4.
GOLDEN = [["q0018", "q0016", "q0015", "q0006"], ["q0014", "q0008", "q0007", "q0011"],
          ["q0013", "q0009", "q0012", "q0005"], ["q0002", "q0000", "q0001", "q0004"],
          ["q0019", "q0023", "q0021", "q0024"], ["q0022", "q0020", "q0025", "q0022"],
          ["q0019", "q0020", "q0021", "q0023"], ["q0025", "q0024", "q0009", "q0012"],
          ["q0006", "q0013", "q0008", "q0014"], ["q0011", "q0007", "q0016", "q0015"],
          ["q0018", "q0005", "q0000", "q0002"], ["q0001", "q0004", "q0019", "q0022"]]
GOLDEN_SUMS = [673.707325, 760.24301, 493.777215, 349.117589, 625.859923, 614.651245, 500.857131, 608.021124,
               796.786238, 744.309839, 359.704378, 448.344923]  # sum |prompt_embeds| per batch (float32 view)
GOLDEN_STATS = {"samples": 48, "truncated": 0, "bad": {"bad_embedding": 2, "invalid_utf8": 2, "missing_txt": 2},
                "skipped_shards": []}
OPTS = ReadOptions(pre_encoded=True, read_attempts=2, read_backoff_s=0.01)


class CountingRanges:
    """Records every ranged read (a test spy around storage.RangeReader.read)."""

    def __init__(self, monkeypatch):
        self.reads: list[tuple[str, int]] = []
        original = storage.RangeReader.read

        def read(rr, start, end):
            out = original(rr, start, end)
            self.reads.append((os.path.basename(rr.url), len(out)))
            return out

        monkeypatch.setattr(storage.RangeReader, "read", read)


def _ranged(monkeypatch, block: int = 1024) -> None:
    """Index every shard from its headers (not one whole fetch), in small blocks."""
    monkeypatch.setattr(tar_index, "WHOLE_BYTES", 2048)
    monkeypatch.setattr(tar_index, "BLOCK", block)


def _take(stream, n):
    out = []
    for _ in range(n):
        b = next(stream)
        out.append((b.keys, round(float(b.embeddings["prompt_embeds"].double().abs().sum()), 6)))
    return out


@pytest.mark.parametrize("mode", ["whole", "ranged", "ranged-pieces"])
def test_streamed_order_is_the_whole_shard_readers(tmp_path, monkeypatch, mode):
    urls = stream_data.write(str(tmp_path))
    if mode.startswith("ranged"):
        _ranged(monkeypatch)
    if mode.endswith("pieces"):
        monkeypatch.setattr(reader_mod, "PIECE_SAMPLES", 2)
    spy = CountingRanges(monkeypatch)
    s = PromptStream(urls, 4, seed=11, options=OPTS)
    got = _take(s, 12)
    assert [k for k, _ in got] == GOLDEN
    assert [v for _, v in got] == pytest.approx(GOLDEN_SUMS, abs=1e-5)
    assert json.loads(json.dumps(s.state_dict()["stats"])) == GOLDEN_STATS
    batch = next(s)
    assert batch.embeddings.entries["prompt_embeds"].data.dtype == torch.float8_e4m3fn  # as stored
    s.close()
    if mode.startswith("ranged"):
        biggest = max(os.path.getsize(u) for u in urls)
        # never a whole shard in one read: the largest is the zero padding after the last member (checked)
        assert max(n for _, n in spy.reads) <= 10240 < biggest // 2


def test_a_mid_shard_cursor_resumes_exactly_in_ranged_mode(tmp_path, monkeypatch):
    urls = stream_data.write(str(tmp_path))
    _ranged(monkeypatch)
    monkeypatch.setattr(reader_mod, "PIECE_SAMPLES", 3)
    s = PromptStream(urls, 4, seed=11, options=OPTS)
    first = [next(s).keys for _ in range(5)]  # batch 5 ends inside shard 3 (the first of epoch 1's)
    state = json.loads(json.dumps(s.state_dict()))
    s.close()
    assert state["sample_pos"] > 0
    r = PromptStream(urls, 4, seed=11, options=OPTS)
    r.load_state_dict(state)
    rest = [next(r).keys for _ in range(7)]
    r.close()
    assert first + rest == GOLDEN


def test_a_big_shard_is_read_one_sample_per_request(s3_server, monkeypatch):
    """On the S3 server: the index costs about one small read per sample (the block after each large member),
    the samples one read each; nothing close to the shard's size is ever requested at once."""
    root = new_bucket("big") + "/p"
    samples = [(f"b{i:03d}", {"txt": f"prompt {i}".encode(), "emb.npy": _npy(i)}) for i in range(40)]
    url = storage.join(root, "shard-000000.tar")
    storage.put_bytes(url, tar_bytes(samples))
    size = storage.size(url)
    monkeypatch.setattr(tar_index, "WHOLE_BYTES", 64 << 10)
    monkeypatch.setattr(tar_index, "BLOCK", 4 << 10)
    spy = CountingRanges(monkeypatch)
    result = ShardReader([url], 0, ReadOptions(pre_encoded=True)).read(ShardTask(0, 0, 0, 0, 0))
    assert len(result.items) == 40 and all(isinstance(r, PromptRecord) for _, r in result.items)
    span = 32 * 1024 + 1024 + 1024  # one sample: its .npy (32 KiB + header) and txt, with their tar headers
    assert max(n for _, n in spy.reads) <= max(64 << 10, span)
    assert sum(n for _, n in spy.reads) < 1.35 * size  # the payloads once, plus the headers' blocks
    assert len(spy.reads) <= 2 * 40 + 4


def _npy(i: int) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.full((8, 1024), i, dtype=np.float32))
    return buf.getvalue()


def _damaged(root: str) -> list[str]:
    good = tar_bytes(prompt_samples(0, 12, prefix="g"))
    urls = [storage.join(root, f"d-{i}.tar") for i in range(4)]
    storage.put_bytes(urls[0], good)
    storage.put_bytes(urls[1], good[:5000])  # cut inside a member
    corrupt = bytearray(tar_bytes(prompt_samples(20, 12, prefix="c")))
    corrupt[4 * 1024:4 * 1024 + 100] = b"\x07" * 100  # a header in the middle: garbage
    storage.put_bytes(urls[2], bytes(corrupt))
    storage.put_bytes(urls[3], good + b"\x01" * 3000)  # data after the end-of-archive marker
    return urls


@pytest.mark.parametrize("mode", ["whole", "ranged"])
def test_a_damaged_shard_is_skipped_whole_and_named(tmp_path, monkeypatch, mode):
    if mode == "ranged":
        _ranged(monkeypatch, block=512)
    urls = _damaged(str(tmp_path))
    opts = ReadOptions(read_attempts=2, read_backoff_s=0.01, shuffle_shards=False)
    s = PromptStream(urls, 4, seed=0, options=opts)
    keys = [k for _ in range(6) for k in next(s).keys]  # 12 good prompts per epoch: d-0.tar only
    assert sorted(keys[:12]) == sorted(keys[12:]) == [f"g{i:05d}" for i in range(12)]
    skipped = {os.path.basename(u): e for u, e in s.stats.skipped_shards}
    assert set(skipped) == {"d-1.tar", "d-2.tar", "d-3.tar"}
    assert "truncated" in skipped["d-1.tar"] and "after 2 attempts" in skipped["d-2.tar"]
    s.close()


def test_a_shard_cut_while_it_is_read_reports_the_rest_as_skipped(tmp_path, monkeypatch):
    _ranged(monkeypatch)
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes(prompt_samples(0, 10, prefix="s")))
    rd = ShardReader([str(path)], 0, ReadOptions(read_attempts=2, read_backoff_s=0.01, shuffle_within_shard=False))
    pieces = rd.pieces(ShardTask(0, 0, 0, 0, 0), piece_samples=4)
    first = next(pieces)
    assert [r.key for _, r in first.items] == [f"s{i:05d}" for i in range(4)] and not first.final
    os.truncate(path, 6 * 1024)  # the object is cut after the index was read (replaced, damaged)
    rest = list(pieces)
    assert len(rest) == 1 and rest[0].final
    used = [r.key for _, r in rest[0].items if isinstance(r, PromptRecord)]
    assert 0 < len(used) < 6 and used == [f"s{i:05d}" for i in range(4, 4 + len(used))]
    assert rest[0].url == str(path)  # the stream reports (url, error) as a skipped shard
    assert "truncated since it was indexed" in rest[0].error and "rest of the shard is skipped" in rest[0].error
    assert not any(isinstance(r, BadRecord) for _, r in rest[0].items)
