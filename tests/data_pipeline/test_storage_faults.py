"""Object-store hygiene (issue 12), against the moto S3 server behind a fault-injecting proxy on loopback:

- an S3 blip (503s and dropped connections for longer than the old 3.5 s of retries) on a shard is retried
  with backoff within `data.retry_window_s`: the shard is read, not skipped;
- a blip longer than the window skips the shard, reported;
- AccessDenied / ExpiredToken stop the stream at once with a message naming the shard and what to check,
  and never count as a skipped shard;
- a validation-rollout upload that fails never raises into training: counted, the next one lands;
- a pre-encoded sample with embeddings of another shape or name is a counted bad record, judged the same
  after a resume from any cursor.
"""
from __future__ import annotations

import io
import json

import pytest
import torch

from data_pipeline import storage
from data_pipeline.reader import ReadOptions
from data_pipeline.stream import PromptStream
from tests.data_pipeline.helpers import new_bucket, tar_bytes, write_shards
from tests.s3_fault_proxy import FaultProxy

FAST = dict(read_attempts=2, read_backoff_s=0.05, shuffle_shards=False, shuffle_within_shard=False)


@pytest.fixture
def proxy(s3_server, monkeypatch):
    p = FaultProxy(s3_server).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)  # everything below talks to the store through it
    try:
        yield p
    finally:
        p.stop()


def _keys(stream, n):
    return [k for _ in range(n) for k in next(stream).keys]


def test_a_blip_longer_than_the_old_retries_does_not_skip_a_shard(proxy):
    urls = write_shards(new_bucket() + "/p", [3, 3])
    # every GET of shard 1 fails for 6 s: 503s, then dropped connections
    proxy.add_rule("503", "GET", "shard-000001", seconds=3.0)
    proxy.add_rule("reset", "GET", "shard-000001", seconds=6.0)
    s = PromptStream(urls, 3, options=ReadOptions(retry_window_s=60.0, **FAST))
    assert _keys(s, 2) == [f"k{i:05d}" for i in range(6)]
    assert s.stats.skipped_shards == [] and proxy.counts["503"] + proxy.counts["reset"] >= 3
    s.close()


def test_a_blip_longer_than_the_window_skips_the_shard_and_says_so(proxy):
    urls = write_shards(new_bucket() + "/p", [3, 3])
    proxy.add_rule("503", "GET", "shard-000000", seconds=600.0)
    s = PromptStream(urls, 3, options=ReadOptions(retry_window_s=1.0, **FAST))
    assert _keys(s, 1) == ["k00003", "k00004", "k00005"]
    [(url, error)] = s.stats.skipped_shards
    assert url == urls[0] and "data.retry_window_s" in error
    s.close()


@pytest.mark.parametrize("kind, code", [("403", "AccessDenied"), ("expired", "ExpiredToken")])
def test_credential_errors_stop_at_once_and_are_not_bad_shards(proxy, kind, code):
    urls = write_shards(new_bucket() + "/p", [3, 3])
    proxy.add_rule(kind, "GET", "shard-000001")
    s = PromptStream(urls, 3, options=ReadOptions(retry_window_s=60.0, **FAST))
    assert _keys(s, 1) == ["k00000", "k00001", "k00002"]
    with pytest.raises(storage.StorageAccessError) as err:
        next(s)
    message = str(err.value)
    assert urls[1] in message and "access denied" in message and "credentials" in message and "\n" not in message
    assert "testing" not in message  # never a credential value
    assert s.stats.skipped_shards == [] and proxy.counts[kind] <= 2  # no retry loop on a refusal
    s.close()


def test_a_failed_rollout_upload_never_reaches_training(proxy):
    from tests.trainer.evaluation.test_rollouts import toy_cfg, toy_student
    from models.families.toy2d import Toy2DFamily
    from trainer.evaluation.rollouts import RolloutHook, RolloutUploader

    out = new_bucket() + "/run"
    cfg = toy_cfg(out)
    hook = RolloutHook(cfg, Toy2DFamily(), toy_student(cfg), uploader=RolloutUploader(attempts=2, backoff_s=0.05))
    proxy.add_rule("500", "PUT", "step_00000002", seconds=120.0)  # the store keeps failing this rollout
    m2 = hook(step=2)  # returns: the upload is queued
    proxy.add_rule("reset", "PUT", "step_00000004", hits=1)  # a transient reset: retried
    hook(step=4)
    hook.close()
    assert hook.uploader.failures == 1 and "rollout/x0_std" in m2
    assert not storage.exists(storage.join(out, "rollouts", "step_00000002", "metrics.json"))
    meta = json.loads(storage.get_bytes(storage.join(out, "rollouts", "step_00000004", "metrics.json")))
    assert meta["step"] == 4


def _emb_sample(key: str, emb: dict) -> tuple[str, dict[str, bytes]]:
    buf = io.BytesIO()
    torch.save(emb, buf)
    return key, {"txt": f"prompt {key}".encode(), "emb.pth": buf.getvalue()}


def test_a_bad_pre_encoded_sample_is_counted_and_skipped(tmp_path):
    good = lambda i: {"prompt_embeds": torch.full((4 + i % 3, 8), float(i)), "pooled": torch.full((8,), float(i))}
    samples = [_emb_sample(f"s{i:03d}", good(i)) for i in range(6)]
    samples[2] = _emb_sample("s002", {"prompt_embeds": torch.zeros(4, 7), "pooled": torch.zeros(8)})  # width
    samples[4] = _emb_sample("s004", {"prompt_embeds": torch.zeros(4, 8), "pooled_x": torch.zeros(8)})  # name
    storage.put_bytes(str(tmp_path / "a.tar"), tar_bytes(samples[:3]))
    storage.put_bytes(str(tmp_path / "b.tar"), tar_bytes(samples[3:] + [_emb_sample("s006", good(6))]))
    opts = ReadOptions(pre_encoded=True, **FAST)
    s = PromptStream(str(tmp_path), 2, options=opts)
    batches = [next(s) for _ in range(2)]
    assert [b.keys for b in batches] == [["s000", "s001"], ["s003", "s005"]]
    assert batches[1].embeddings["prompt_embeds"].shape == (2, 6, 8)  # padded to the longest, stacked
    assert s.stats.bad["bad_embedding"] == 2
    assert {(b.key, b.reason) for b in s.stats.bad_records} == {("s002", "bad_embedding"), ("s004", "bad_embedding")}
    # resumed from the cursor after batch 1 (past shard a): s004 is judged as before
    cursor = batches[0].cursor
    r = PromptStream(str(tmp_path), 2, options=opts)
    r.load_state_dict(json.loads(json.dumps(cursor)))
    assert next(r).keys == ["s003", "s005"] and r.stats.bad["bad_embedding"] == 2
    s.close()
    r.close()
