"""Embeddings in their stored dtype (issue 22, data_pipeline/compact.py): a batch of packed samples keeps fp8 +
scale / bf16 and trimmed sequences; converted (on the device) it equals what the whole-shard reader gave
(`packing.from_bytes`, zero-padded, stacked), cast to the compute dtype; the bytes that cross to the device are
the stored ones, not float32."""
from __future__ import annotations

import pickle

import pytest
import torch

from data_pipeline.compact import EmbeddingBatch, from_payload, lengths, payload, signature
from data_pipeline.encoding.packing import from_bytes, to_bytes
from data_pipeline.stream import PromptBatch
from tests.data_pipeline.stream_data import embeddings


def _reference(raws: list[bytes]) -> dict[str, torch.Tensor]:
    """What the reader gave before: each sample unpacked to float32, padded to its mask, then stacked."""
    dense = [from_bytes(r) for r in raws]
    return {n: torch.stack([d[n] for d in dense]) for n in dense[0]}


def _stored(raws: list[bytes]) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load

    return [load(r) for r in raws]


@pytest.mark.parametrize("dtype,stored", [("fp8", torch.float8_e4m3fn), ("bf16", torch.bfloat16)])
def test_a_batch_stays_stored_and_converts_to_what_the_reader_gave(dtype, stored):
    raws = [to_bytes(embeddings(i), dtype) for i in range(5)]  # prompts of 2..6 tokens of 12
    batch = EmbeddingBatch.stack(_stored(raws))
    ref = _reference(raws)
    e = batch.entries["prompt_embeds"]
    assert e.data.dtype == stored and e.rows.tolist() == [2, 3, 4, 5, 6] and e.data.shape == (20, 16)
    assert (e.scale is not None) == (dtype == "fp8") and batch.entries["prompt_embeds_mask"].data.dtype == torch.long
    # only the prompts' rows travel, as stored (+ a float32 scale per sample): not 5 x 12 rows of float32
    size = e.data.element_size()
    assert e.nbytes() == 20 * 16 * size + (5 * 4 if dtype == "fp8" else 0) + 5 * 8
    assert e.nbytes() <= (0.13 if dtype == "fp8" else 0.2) * ref["prompt_embeds"].numel() * 4
    for name, want in ref.items():
        assert torch.equal(batch[name], want), name  # the CPU view: exactly the old reader's tensors
    on = batch.to("cpu", torch.bfloat16)
    assert on["prompt_embeds"].dtype == torch.bfloat16 and on["prompt_embeds_mask"].dtype == torch.long
    assert torch.equal(on["prompt_embeds"], ref["prompt_embeds"].to(torch.bfloat16))
    assert torch.equal(on["pooled"], ref["pooled"].to(torch.bfloat16))


def test_a_rank_slice_pads_to_the_global_batch_and_stacks_the_same_from_payloads():
    raws = [to_bytes(embeddings(i), "fp8") for i in (0, 7, 1, 2)]  # 2, 9, 3, 4 tokens
    whole = EmbeddingBatch.stack(_stored(raws))
    part = whole.slice([0, 2])  # rank 0 of 2: tokens 2 and 3, padded to the batch's 12 like the others
    ref = _reference(raws)
    assert part.entries["prompt_embeds"].data.shape[0] == 5
    assert torch.equal(part["prompt_embeds"], ref["prompt_embeds"][[0, 2]])
    # a rank that stacks its own samples (fetched from DataWorkers) with the global lengths gets the same
    samples = [from_payload(payload(s)) for s in _stored([raws[0], raws[2]])]
    pad_to = {n: max(lengths(s)[n] for s in _stored(raws)) for n in lengths(samples[0])}
    mine = EmbeddingBatch.stack(samples, pad_to)
    for name in ref:
        assert torch.equal(mine[name], ref[name][[0, 2]]), name
    assert signature(samples[0]) == {"pooled": [1], "prompt_embeds": [2, 16], "prompt_embeds_mask": [1]}


def test_a_payload_is_the_stored_bytes_and_fp8_batches_survive_pickling():
    emb = _stored([to_bytes(embeddings(4), "fp8")])[0]
    raw = payload(emb)
    stored = sum(t.numel() * t.element_size() for t in emb.values())
    assert stored <= len(raw) <= stored + 1024  # tensors as stored, plus a safetensors header
    back = from_payload(raw)
    assert all(torch.equal(back[k].view(torch.uint8), emb[k].view(torch.uint8)) for k in emb)
    batch = PromptBatch(["a"], ["p"], [{}], EmbeddingBatch.stack([emb]), {})
    # torch 2.13 pickles an fp8 tensor but cannot load it back; Ray moves batches by pickling
    again = pickle.loads(pickle.dumps(batch))
    assert again.embeddings.entries["prompt_embeds"].data.dtype == torch.float8_e4m3fn
    assert torch.equal(again.embeddings["prompt_embeds"], batch.embeddings["prompt_embeds"])


def test_mixed_storage_formats_fall_back_to_float32():
    a = _stored([to_bytes(embeddings(1), "fp8")])[0]
    b = _stored([to_bytes(embeddings(2), "bf16")])[0]
    batch = EmbeddingBatch.stack([a, b])
    assert batch.entries["pooled"].data.dtype == torch.float32
    ref = _reference([to_bytes(embeddings(1), "fp8"), to_bytes(embeddings(2), "bf16")])
    assert torch.equal(batch["prompt_embeds"], ref["prompt_embeds"])


def _convert_on_the_device() -> dict:
    """In a process of its own: OnDevice converts a compact batch on the (emulated) accelerator."""
    from tests.device_emulation import _Mode, device, emulated_device
    from trainer.rank_program import OnDevice

    crossed = []  # dtypes of the float tensors copied from the host to the device
    inner = _Mode.__torch_dispatch__

    def spy(self, func, types, args=(), kwargs=None):
        kw = kwargs or {}
        if func is torch.ops.aten._to_copy.default and str(kw.get("device", "")).startswith("emu"):
            if args[0].is_floating_point():
                crossed.append(str(args[0].dtype))
        return inner(self, func, types, args, kwargs)

    _Mode.__torch_dispatch__ = spy
    raws = [to_bytes(embeddings(i), "fp8") for i in range(4)]
    batch = EmbeddingBatch.stack(_stored(raws))
    cpu = batch.to("cpu", torch.bfloat16)
    with emulated_device():
        _, cond = next(OnDevice(iter([(torch.zeros(4, 2, dtype=torch.float64), batch)]), device(), torch.bfloat16))
        out = {k: (str(v.device), str(v.dtype), v.cpu()) for k, v in cond.items()}
    return {"crossed": crossed, "out": out, "cpu": cpu}


def test_embeddings_are_converted_on_the_device_from_their_stored_bytes():
    from tests.device_emulation import run_isolated

    got = run_isolated(_convert_on_the_device)
    # the noise (float64 here), the scales (float32, one per sample) and the fp8 payload cross; no float32
    # or bf16 embedding does
    assert "torch.float8_e4m3fn" in got["crossed"] and "torch.bfloat16" not in got["crossed"]
    assert got["crossed"].count("torch.float32") == 2  # the two names' scales (B,)
    for name, (dev, dtype, value) in got["out"].items():
        assert dev == "emu:0" and torch.equal(value, got["cpu"][name]), name
    assert got["out"]["prompt_embeds"][1] == "torch.bfloat16" and got["out"]["prompt_embeds_mask"][1] == "torch.int64"
