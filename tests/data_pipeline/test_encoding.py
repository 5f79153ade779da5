"""Packed embedding storage (data_pipeline/encoding): bf16 / fp8 with a per-tensor scale within their rounding
bounds, padding past a masked prompt not stored and restored as zeros, unmasked sequences (FLUX T5) kept whole,
the reader restoring the padded tensors; the encode worker's shards read back through the normal reader."""
from __future__ import annotations

import tarfile

import pytest
import torch

from data_pipeline.encoding.job import EncodeShardWorker
from data_pipeline.encoding.packing import FP8_MAX, from_bytes, pack, to_bytes
from data_pipeline.reader import ReadOptions
from data_pipeline.stream import PromptStream
from models.families import load_text_encoder
from tests.data_pipeline.helpers import write_shards
from trainer.config import config_from_dict


def qwen_like(T=12, n=5, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.zeros(T, D)
    emb[:n] = 3 * torch.randn(n, D, generator=g)
    mask = torch.zeros(T, dtype=torch.long)
    mask[:n] = 1
    return {"prompt_embeds": emb, "prompt_embeds_mask": mask, "pooled": torch.randn(D, generator=g)}


def test_padding_past_the_mask_is_not_stored_and_is_restored():
    e = qwen_like()
    stored = pack(e, "float32")
    assert stored["prompt_embeds"].shape == (5, 64) and torch.equal(stored["prompt_embeds_mask"], e["prompt_embeds_mask"])
    back = from_bytes(to_bytes(e, "float32"))
    assert torch.equal(back["prompt_embeds"], e["prompt_embeds"]) and back["prompt_embeds"].shape == (12, 64)
    assert back["prompt_embeds_mask"].dtype == torch.long and torch.equal(back["pooled"], e["pooled"])
    # no mask (FLUX's T5 sequence): every position is kept, its values matter to the transformer
    flux = {"prompt_embeds": torch.randn(12, 64), "pooled_prompt_embeds": torch.randn(32)}
    assert pack(flux, "bf16")["prompt_embeds"].shape == (12, 64)
    # a mask that is not left-aligned ones is not trusted: nothing trimmed
    odd = dict(e, prompt_embeds_mask=torch.tensor([1, 0] * 6))
    assert pack(odd, "float32")["prompt_embeds"].shape == (12, 64)


@pytest.mark.parametrize("dtype,rel", [("bf16", 2 ** -8), ("fp8", 2 ** -3)])
def test_bf16_and_fp8_round_within_their_bounds(dtype, rel):
    e = qwen_like(seed=1)
    back = from_bytes(to_bytes(e, dtype))
    x, y = e["prompt_embeds"][:5], back["prompt_embeds"][:5]
    amax = float(x.abs().max())
    # relative rounding of the format, plus the subnormal floor of e4m3 (2^-9 of the scale) for fp8
    bound = rel * x.abs() + (amax / FP8_MAX * 2 ** -9 if dtype == "fp8" else 0)
    assert torch.all((x - y).abs() <= bound + 1e-12)
    assert float((x - y).abs().max()) > 0  # it is lossy: the test sees the format
    assert torch.equal(back["prompt_embeds"][5:], torch.zeros(7, 64))
    if dtype == "fp8":
        stored = pack(e, "fp8")
        assert stored["prompt_embeds"].dtype == torch.float8_e4m3fn
        assert abs(float(stored["prompt_embeds@scale"][0]) - amax / FP8_MAX) < 1e-9
        assert float(stored["prompt_embeds"].float().abs().max()) == FP8_MAX  # the scale uses the full range


def test_sizes_fp8_at_most_a_quarter_of_float32():
    e = {"prompt_embeds": torch.randn(512, 256), "pooled_prompt_embeds": torch.randn(64)}
    f32, bf16, fp8 = (len(to_bytes(e, d)) for d in ("float32", "bf16", "fp8"))
    assert bf16 <= 0.51 * f32 and fp8 <= 0.26 * f32


def test_encode_worker_output_reads_back_through_the_stream(tmp_path):
    urls = write_shards(str(tmp_path / "raw"), [3, 2])
    cfg = config_from_dict({"model": {"family": "qwen_image", "tiny": True, "max_sequence_length": 16}})
    encode = load_text_encoder(cfg)
    worker = EncodeShardWorker(encode, "bf16")
    out = [str(tmp_path / "enc" / u.rsplit("/", 1)[1]) for u in urls]
    (tmp_path / "enc").mkdir()
    results = [worker(u, o) for u, o in zip(urls, out)]
    assert [r["samples"] for r in results] == [3, 2] and not any(r["bad"] for r in results)
    with tarfile.open(out[0]) as t:
        assert sorted(t.getnames())[:2] == ["k00000.emb.safetensors", "k00000.txt"]
    ref = encode(["prompt 0", "prompt 1", "prompt 2"])
    stream = PromptStream(out, 3, options=ReadOptions(pre_encoded=True, shuffle_shards=False,
                                                      shuffle_within_shard=False))
    batch = next(stream)
    got = batch.embeddings
    assert batch.prompts == ["prompt 0", "prompt 1", "prompt 2"]
    T = int(ref["prompt_embeds_mask"].sum(1).max())
    assert torch.equal(got["prompt_embeds_mask"][:, :T], ref["prompt_embeds_mask"][:, :T])
    assert torch.allclose(got["prompt_embeds"][:, :T], ref["prompt_embeds"][:, :T], rtol=2 ** -8, atol=1e-6)
    assert torch.equal(got["negative_prompt_embeds_mask"], ref["negative_prompt_embeds_mask"])
