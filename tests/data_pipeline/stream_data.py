"""A pre-encoded dataset for the streaming tests (issue 22): Qwen-Image-like embeddings stored packed (fp8 with
a scale, the sequence trimmed to its prompt under a mask), prompts of varied lengths, and bad records of each
kind the stream judges (missing txt, invalid UTF-8, an embedding of another width). Deterministic bytes: the
golden key order in test_streaming.py was recorded from the whole-shard reader this replaced (commit 388e1f3)."""
from __future__ import annotations

import torch

from data_pipeline import storage
from data_pipeline.encoding.packing import to_bytes
from tests.data_pipeline.helpers import tar_bytes

SIZES = [6, 9, 4, 7]
T, D = 12, 16


def embeddings(i: int, width: int = D) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    n = 2 + i % 9  # the prompt's tokens: sequences of 2..10 of T rows
    emb = torch.zeros(T, width)
    emb[:n] = 2 * torch.randn(n, width, generator=g)
    mask = torch.zeros(T, dtype=torch.long)
    mask[:n] = 1
    return {"prompt_embeds": emb, "prompt_embeds_mask": mask, "pooled": torch.randn(width, generator=g)}


def sample(i: int, dtype: str = "fp8") -> tuple[str, dict[str, bytes]]:
    members = {"txt": f"prompt number {i}".encode(), "emb.safetensors": to_bytes(embeddings(i), dtype)}
    if i == 3:
        del members["txt"]  # missing_txt
    if i == 10:
        members["txt"] = b"caf\xc3 \xff"  # invalid_utf8
    if i == 17:
        members["emb.safetensors"] = to_bytes(embeddings(i, width=D + 1), dtype)  # bad_embedding (schema)
    return f"q{i:04d}", members


def write(root: str, dtype: str = "fp8") -> list[str]:
    urls, i = [], 0
    for s, n in enumerate(SIZES):
        url = storage.join(root, f"shard-{s:06d}.tar")
        storage.put_bytes(url, tar_bytes([sample(i + j, dtype) for j in range(n)]))
        urls.append(url)
        i += n
    return urls
