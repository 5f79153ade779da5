import io
import json
import tarfile

import pytest
import torch

from data_pipeline import storage
from data_pipeline.reader import ReadOptions
from data_pipeline.shards import build_shards, encode_shards, inspect, normalize_text, resolve_shards
from data_pipeline.stream import PromptStream
from tests.data_pipeline.helpers import new_bucket

PROMPTS = ["a  red\tcat", "a red cat", "", "a blue dog ", "cafe\u0301 au lait", "café au lait", "x"]


def _members(url: str) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(storage.get_bytes(url))) as tar:
        return tar.getnames()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_build_inspect_roundtrip_txt(tmp_path, where, request):
    src = tmp_path / "p.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    out = str(tmp_path / "out") if where == "local" else (request.getfixturevalue("s3_server"), new_bucket())[1] + "/sh"
    rep = build_shards(str(src), out, per_shard=2, normalize=True, dedup=True, progress=False)
    want = ["a red cat", "a blue dog", "café au lait", "x"]  # normalised (NFC, spaces), empty and dups dropped
    assert rep.samples == 4 and rep.empty == 1 and rep.duplicates == 2
    assert [storage.basename(u) for u in rep.urls] == ["shard-000000.tar", "shard-000001.tar"]
    assert resolve_shards(out) == rep.urls
    assert _members(rep.urls[0]) == ["000000000.txt", "000000001.txt"]
    ins = inspect(out, num_examples=10)
    assert [r.txt for r in ins.examples] == want and ins.samples == 4 and not ins.bad and not ins.unreadable
    assert [n for _, n in ins.shards] == [2, 2]
    with pytest.raises(FileExistsError, match="already holds 2 shards"):
        build_shards(str(src), out, progress=False)


def test_build_without_normalize_keeps_text_and_dups(tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    rep = build_shards(str(src), str(tmp_path / "o"), per_shard=100, progress=False)
    ins = inspect(str(tmp_path / "o"), num_examples=10)
    assert rep.samples == 6 and [r.txt for r in ins.examples] == [p for p in PROMPTS if p]


def test_build_from_jsonl_csv_parquet_with_meta(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"caption": "one", "seed": 1, "negative_prompt": "bad"}, {"caption": "two", "seed": 2}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "a.csv").write_text("caption,seed,negative_prompt\none,1,bad\ntwo,2,\n")
    pq.write_table(pa.table({"caption": ["one", "two"], "seed": [1, 2], "negative_prompt": ["bad", None]}),
                   tmp_path / "a.parquet")
    for ext in ("jsonl", "csv", "parquet"):
        out = str(tmp_path / f"out_{ext}")
        build_shards(str(tmp_path / f"a.{ext}"), out, column="caption", progress=False)
        ex = inspect(out, num_examples=5).examples
        assert [(r.txt, r.meta) for r in ex] == [("one", {"negative_prompt": "bad", "seed": 1}),
                                                 ("two", {"seed": 2})], ext
    with pytest.raises(ValueError, match="no column 'prompt'"):
        build_shards(str(tmp_path / "a.csv"), str(tmp_path / "x"), progress=False)
    with pytest.raises(ValueError, match="unsupported input"):
        build_shards(str(tmp_path / "a.xml"), str(tmp_path / "y"), progress=False)


def test_normalize_text():
    assert normalize_text("  a\n\t b  ") == "a b"
    assert normalize_text("cafe\u0301") == "caf\u00e9"


class HashEncoder:
    """A small deterministic local encoder (stands in for the real text encoders of models/): bytes -> floats."""

    def __call__(self, prompts):
        L = 6
        ids = torch.zeros(len(prompts), L, dtype=torch.long)
        for i, p in enumerate(prompts):
            b = list(p.encode("utf-8"))[:L]
            ids[i, : len(b)] = torch.tensor(b)
        return {"prompt_embeds": ids.float().unsqueeze(-1) / 255.0,  # (B, L, 1)
                "pooled": ids.sum(1, keepdim=True).to(torch.bfloat16)}  # (B, 1)


def test_encode_writes_pth_beside_txt_and_stream_passes_it_through(tmp_path, s3_server):
    src = tmp_path / "p.txt"
    src.write_text("hello\nworld\nthird one\n")
    raw = new_bucket() + "/raw"
    enc = new_bucket() + "/enc"
    build_shards(str(src), raw, per_shard=2, progress=False)
    rep = encode_shards(raw, enc, HashEncoder(), progress=False)
    assert rep.samples == 3 and not rep.bad
    urls = resolve_shards(enc)
    assert _members(urls[0]) == ["000000000.emb.pth", "000000000.txt", "000000001.emb.pth", "000000001.txt"]
    with tarfile.open(fileobj=io.BytesIO(storage.get_bytes(urls[0]))) as tar:
        d = torch.load(io.BytesIO(tar.extractfile("000000001.emb.pth").read()), weights_only=True)
    ref = HashEncoder()(["world"])
    assert torch.equal(d["prompt_embeds"], ref["prompt_embeds"][0]) and d["pooled"].dtype == torch.bfloat16
    assert d["prompt_embeds"].untyped_storage().nbytes() == 6 * 4  # one sample's storage, not the batch's

    s = PromptStream(enc, 3, seed=0, options=ReadOptions(pre_encoded=True, shuffle_shards=False,
                                                         shuffle_within_shard=False))
    b = next(s)
    assert b.prompts == ["hello", "world", "third one"]
    want = HashEncoder()(b.prompts)
    assert torch.equal(b.embeddings["prompt_embeds"], want["prompt_embeds"])
    assert torch.equal(b.embeddings["pooled"], want["pooled"])
    half = b.slice(1, 3)
    assert half.keys == [b.keys[1]] and torch.equal(half.embeddings["pooled"], want["pooled"][1:2])
    s.close()
    # raw shards without embeddings are bad records when pre_encoded is required
    ins = inspect(raw, options=ReadOptions(pre_encoded=True))
    assert {b.reason for b in ins.bad} == {"bad_embedding"} and ins.samples == 0


def test_online_encoding_in_stream_equals_pre_encoded(tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("".join(f"prompt {i}\n" for i in range(9)))
    build_shards(str(src), str(tmp_path / "raw"), per_shard=4, progress=False)
    s = PromptStream(str(tmp_path / "raw"), 3, seed=5, options=ReadOptions(encode_batch_size=2),
                     encoder_factory=HashEncoder)
    b = next(s)
    assert torch.equal(b.embeddings["prompt_embeds"], HashEncoder()(b.prompts)["prompt_embeds"])
    s.close()


def test_sequence_embeddings_of_different_lengths_are_zero_padded_on_batching():
    from data_pipeline.records import PromptRecord
    from data_pipeline.stream import _stack_embeddings

    a = PromptRecord("a", "x", embeddings={"e": torch.ones(2, 3), "e_mask": torch.ones(2, dtype=torch.long)})
    b = PromptRecord("b", "y", embeddings={"e": torch.ones(4, 3), "e_mask": torch.ones(4, dtype=torch.long)})
    out = _stack_embeddings([a, b])
    assert out["e"].shape == (2, 4, 3) and out["e"][0, 2:].abs().sum() == 0
    assert out["e_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    c = PromptRecord("c", "z", embeddings={"e": torch.ones(2, 5), "e_mask": torch.ones(2, dtype=torch.long)})
    with pytest.raises(ValueError, match="incompatible shapes"):
        _stack_embeddings([a, c])
