"""Shard-writing helpers for the data tests (raw tarfile, so tests can write what the builder never would)."""
from __future__ import annotations

import io
import tarfile
import uuid

from data_pipeline import storage


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def prompt_samples(start: int, n: int, prefix: str = "k") -> list[tuple[str, dict[str, bytes]]]:
    return [(f"{prefix}{i:05d}", {"txt": f"prompt {i}".encode()}) for i in range(start, start + n)]


def write_shards(root: str, sizes: list[int], prefix: str = "k") -> list[str]:
    """Shards of good prompts with running keys; returns their URLs."""
    urls, start = [], 0
    for i, n in enumerate(sizes):
        url = storage.join(root, f"shard-{i:06d}.tar")
        storage.put_bytes(url, tar_bytes(prompt_samples(start, n, prefix)))
        urls.append(url)
        start += n
    return urls


def new_bucket(prefix: str = "t") -> str:
    url = f"s3://{prefix}-{uuid.uuid4().hex[:12]}"
    storage.makedirs(url)
    return url
