"""Pre-encoding one prompt shard: read (strict, bad records skipped and listed), encode with the text encoders
built once per worker, store each sample's embeddings packed (packing.py) as `KEY.emb.safetensors` beside its
`txt` (and `json`, and the `latent.npy` of a latent shard), and write the output tar in one atomic put.

The output is a function of the input shard and the settings (fixed sample order, encoder batches cut the same
way, deterministic safetensors and tar bytes), so a killed job's rerun, which skips the finished shards,
produces exactly the bytes an uninterrupted run would.
"""
from __future__ import annotations

import io
import json
from dataclasses import replace
from typing import Any, Optional

from data_pipeline import storage
from data_pipeline.encoding.packing import StoreDtype, to_bytes, unpack
from data_pipeline.order import ShardTask
from data_pipeline.reader import Encoder, ReadOptions, ShardReader
from data_pipeline.records import LATENT_KEY, BadRecord
from data_pipeline.shards import tar_bytes


def _npy(t) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, t.float().numpy(), allow_pickle=False)
    return buf.getvalue()


class EncodeShardWorker:
    """`worker(src_url, out_url) -> {"samples", "prompts_bytes", "bad"}`; the encoder is built by the caller once."""

    def __init__(self, encode: Encoder, dtype: StoreDtype = "bf16", options: Optional[ReadOptions] = None):
        self.encode, self.dtype = encode, dtype
        self.options = replace(options or ReadOptions(), shuffle_shards=False, shuffle_within_shard=False,
                               pre_encoded=False)

    def __call__(self, src: str, out: str) -> dict[str, Any]:
        reader = ShardReader([src], 0, self.options, lambda: self.encode)
        result = reader.read(ShardTask(0, 0, 0, 0, 0))
        if result.error is not None:
            return {"samples": 0, "emb_bytes": 0, "bad": [f"{storage.basename(src)}: unreadable: {result.error}"]}
        samples, bad, emb_bytes = [], [], 0
        for _, item in result.items:
            if isinstance(item, BadRecord):
                bad.append(str(item))
                continue
            emb = unpack(dict(item.embeddings))  # an already packed source: re-packed from its dense form
            latent = emb.pop(LATENT_KEY, None)
            sample = {"__key__": item.key, "txt": item.txt.encode("utf-8"), "emb.safetensors": to_bytes(emb, self.dtype)}
            emb_bytes += len(sample["emb.safetensors"])
            if latent is not None:
                sample[f"{LATENT_KEY}.npy"] = _npy(latent)
            if item.meta:
                sample["json"] = json.dumps(item.meta, ensure_ascii=False).encode("utf-8")
            samples.append(sample)
        if samples:
            storage.put_bytes(out, tar_bytes(samples))
        return {"samples": len(samples), "emb_bytes": emb_bytes, "bad": bad}
