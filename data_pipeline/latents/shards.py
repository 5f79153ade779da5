"""Image shards -> latent shards (one output tar per input tar, same name).

An image sample is `KEY.png|jpg|jpeg|webp` (8-bit, mapped to [-1, 1]) or `KEY.npy` (float (C, H, W) or (H, W)
already in [-1, 1]), with its condition as `KEY.txt` (caption / prompt) or `KEY.cls` (class id; written as the
text "207", the DiT family's prompt form), and an optional `KEY.json` (kept). Images are center-cropped to a
square and resized to `image_size` when given (the ImageNet convention).

A latent sample is `KEY.txt`, `KEY.latent.npy` (float32 (C, h, w), the family's normalised latent, a posterior
sample) and `KEY.json` (the image's json plus `"flip": bool`). `flip`: "none"; "random" (each image flipped
horizontally with probability 1/2, decided by its key); "both" (the image and its mirror, key `KEY_flip`).

Deterministic: the posterior noise and the coin are keyed by (seed, key), tars have a fixed mtime, so an
interrupted job's rerun produces the same bytes. An image that cannot be decoded is a bad record: skipped,
counted and listed with shard and key.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np

from data_pipeline import storage
from data_pipeline.reader import fetch_samples
from data_pipeline.records import LATENT_KEY, BadRecord
from data_pipeline.shards import tar_bytes

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
Flip = Literal["none", "random", "both"]
# images (B, C, H, W) float32 in [-1, 1], one seed per image -> latents (B, c, h, w) float32
ImageEncoder = Callable[[Any, list[int]], Any]


@dataclass
class LatentShardReport:
    src: str
    out: str
    samples: int = 0  # latent samples written
    bad: list[BadRecord] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"samples": self.samples, "bad": [str(b) for b in self.bad]}


def key_seed(seed: int, key: str, what: str) -> int:
    """A 63-bit integer from (seed, key, what): per-image randomness independent of order and worker."""
    digest = hashlib.blake2b(f"{what}:{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _center_crop_resize(img, size: int):
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img if s == size else img.resize((size, size), Image.Resampling.BICUBIC)


def decode_image(members: dict[str, bytes], image_size: int = 0) -> np.ndarray:
    """(C, H, W) float32 in [-1, 1]; ValueError saying what is wrong."""
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is not None:
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(members[ext]))
            img = img.convert("RGB" if img.mode not in ("L", "I;16") else "L")
        except Exception as e:  # noqa: BLE001 - any decoder failure makes this one record bad
            raise ValueError(f"{ext}: cannot decode ({type(e).__name__}: {str(e)[:100]})") from None
        if image_size:
            img = _center_crop_resize(img, image_size)
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if "npy" in members:
        try:
            arr = np.load(io.BytesIO(members["npy"]), allow_pickle=False).astype(np.float32)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"npy: cannot load ({type(e).__name__}: {str(e)[:100]})") from None
        arr = arr[None] if arr.ndim == 2 else arr
        if arr.ndim != 3 or not np.isfinite(arr).all() or np.abs(arr).max() > 1.0 + 1e-6:
            raise ValueError(f"npy: expected a finite (C, H, W) or (H, W) array in [-1, 1], got shape {arr.shape}")
        return arr
    raise ValueError(f"no image member (expected one of {', '.join(IMAGE_EXTS)}, npy; got {sorted(members)})")


def condition_text(members: dict[str, bytes]) -> str:
    """The sample's prompt: `txt`, else the class id of `cls` as text."""
    for ext in ("txt", "cls"):
        if ext in members:
            text = members[ext].decode("utf-8").strip()
            if not text:
                raise ValueError(f"{ext}: empty")
            if ext == "cls" and not text.lstrip("-").isdigit():
                raise ValueError(f"cls: expected an integer class id, got {text[:40]!r}")
            return text
    raise ValueError(f"no caption or label (txt or cls) in {sorted(members)}")


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def make_latent_shard(src: str, out: str, encode: ImageEncoder, flip: Flip = "none", seed: int = 0,
                      image_size: int = 0, batch_size: int = 16, read_attempts: int = 4) -> LatentShardReport:
    """Encode one image shard into the latent shard `out` (written in one atomic put; nothing is written when
    no sample is valid)."""
    import torch

    if flip not in ("none", "random", "both"):
        raise ValueError(f"flip must be none, random or both, got {flip!r}")
    report = LatentShardReport(src, out)
    name = storage.basename(src)
    samples, unreadable = fetch_samples(src, read_attempts, 0.5)
    report.bad.extend(unreadable)
    skip = {b.key for b in unreadable}
    items = []  # (key, image (C,H,W), text, meta, flipped)
    for key, members in samples:
        if key in skip:
            continue
        try:
            image, text = decode_image(members, image_size), condition_text(members)
            meta = json.loads(members["json"].decode("utf-8")) if "json" in members else {}
            if not isinstance(meta, dict):
                raise ValueError("json: expected an object")
        except (ValueError, UnicodeDecodeError) as e:
            report.bad.append(BadRecord(name, key, "bad_image", str(e)[:200]))
            continue
        mirrored = image[:, :, ::-1].copy()
        if flip == "none":
            items.append((key, image, text, meta, False))
        elif flip == "random":
            flipped = key_seed(seed, key, "flip") % 2 == 1
            items.append((key, mirrored if flipped else image, text, meta, flipped))
        else:
            items += [(key, image, text, meta, False), (f"{key}_flip", mirrored, text, meta, True)]
    written = []
    i = 0
    while i < len(items):  # batches of equal image shape, in sample order
        j = i + 1
        while j < len(items) and j - i < batch_size and items[j][1].shape == items[i][1].shape:
            j += 1
        chunk = items[i:j]
        images = torch.from_numpy(np.stack([c[1] for c in chunk]))
        latents = encode(images, [key_seed(seed, c[0], "posterior") for c in chunk]).float().cpu().numpy()
        for (key, _, text, meta, flipped), z in zip(chunk, latents):
            written.append({"__key__": key, "txt": text.encode("utf-8"), f"{LATENT_KEY}.npy": _npy_bytes(z),
                            "json": json.dumps({**meta, "flip": flipped}, ensure_ascii=False).encode("utf-8")})
        i = j
    if written:
        storage.put_bytes(out, tar_bytes(written))
    report.samples = len(written)
    return report


def latent_tasks(src_urls: list[str], out: str) -> list[tuple[str, str]]:
    """(src, out) per input shard: same file name under `out`."""
    storage.makedirs(out)
    return [(u, storage.join(out, storage.basename(u))) for u in src_urls]


def shard_latents(src_urls: list[str], out: str, encode: ImageEncoder, flip: Flip = "none", seed: int = 0,
                  image_size: int = 0, batch_size: int = 16) -> list[LatentShardReport]:
    """In-process form (one worker): every shard whose output does not exist yet."""
    reports = []
    for src, dst in latent_tasks(src_urls, out):
        if not storage.exists(dst):
            reports.append(make_latent_shard(src, dst, encode, flip, seed, image_size, batch_size))
    return reports


class LatentShardWorker:
    """`make_latent_shard` with an encoder built once (for the Ray actor pool of cluster/jobs)."""

    def __init__(self, encode: ImageEncoder, flip: Flip, seed: int, image_size: int, batch_size: int):
        self.encode, self.flip, self.seed = encode, flip, seed
        self.image_size, self.batch_size = image_size, batch_size

    def __call__(self, src: str, out: str) -> dict[str, Any]:
        return make_latent_shard(src, out, self.encode, self.flip, self.seed, self.image_size,
                                 self.batch_size).summary()


def image_samples_tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """An image shard from (key, {ext: bytes}) samples (the digits demo and tests write their images so)."""
    return tar_bytes([{"__key__": k, **m} for k, m in samples])


def digits_image_shards(out: str, split: str = "train", per_shard: int = 500, seed: int = 0) -> list[str]:
    """The real 8x8 digits as an image shard set: `KEY.npy` (1, 8, 8) in [-1, 1] + the demo prompt as txt."""
    from data_pipeline.digits import load_digits_split, prompt_for

    data = load_digits_split(split)
    storage.makedirs(out)
    urls = []
    n = len(data.labels)
    for s, start in enumerate(range(0, n, per_shard)):
        samples = []
        for i in range(start, min(n, start + per_shard)):
            samples.append((f"{split}{i:06d}", {"npy": _npy_bytes(data.images[i].numpy()),
                                                 "txt": prompt_for(int(data.labels[i])).encode("utf-8")}))
        url = storage.join(out, f"{split}-{s:06d}.tar")
        storage.put_bytes(url, image_samples_tar(samples))
        urls.append(url)
    return urls
