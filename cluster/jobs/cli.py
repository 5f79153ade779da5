"""`piflow shards latents` and `piflow shards encode`: shard jobs over a Ray actor pool (cluster/jobs/shard_pool.py).

Both take the config's Ray address (`cluster.address`: "local" starts an in-process Ray), `--workers` actors
(default `data.workers`), each on one GPU when the cluster has GPUs, and skip output shards that exist.
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Any


def latent_worker(cfg: Any, flip: str, seed: int, image_size: int, batch_size: int):
    """Built once per actor: the family's VAE (or identity) wrapped as a shard worker."""
    from data_pipeline.latents.shards import LatentShardWorker
    from models.vae_encoder import load_image_encoder

    return LatentShardWorker(load_image_encoder(cfg), flip, seed, image_size, batch_size)


def encode_worker(cfg: Any, dtype: str):
    """Built once per actor: the config's text encoders (on the actor's GPU when it has one)."""
    import torch

    from data_pipeline.encoding.job import EncodeShardWorker
    from data_pipeline.reader import ReadOptions
    from models.families import load_text_encoder

    encoder = load_text_encoder(cfg)
    if torch.cuda.is_available():  # the actor's GPU (Ray sets CUDA_VISIBLE_DEVICES); outputs come back on the CPU
        for module in vars(encoder).values():
            if isinstance(module, torch.nn.Module):
                module.to("cuda")
    return EncodeShardWorker(encoder, dtype, ReadOptions.from_config(cfg.data))


def _gpus_per_worker(workers: int) -> float:
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    return 0.0 if gpus == 0 else min(1.0, gpus / workers)


def _report_bad(results: list[dict]) -> int:
    bad = [b for r in results for b in r.get("bad", [])]
    for line in bad[:50]:
        print(f"  BAD {line}", file=sys.stderr)
    if len(bad) > 50:
        print(f"  ... and {len(bad) - 50} more bad records", file=sys.stderr)
    return len(bad)


def _run_pool(cfg: Any, tasks: list, factory, workers: int, desc: str, unit: str):
    """Ray up (or attached) for the job, the pool run, and Ray down again if this command started it."""
    import ray

    from cluster.jobs.shard_pool import run_shard_pool
    from cluster.orchestrator import connect

    started = not ray.is_initialized()
    connect(cfg)
    try:
        return run_shard_pool(tasks, factory, workers, gpus_per_worker=_gpus_per_worker(workers),
                              cpus_per_worker=cfg.cluster.data_cpus_per_worker, desc=desc, unit=unit)
    finally:
        if started:
            ray.shutdown()


def latent_shards_job(cfg: Any, images: str, out: str, flip: str = "none", seed: int = 0, workers: int = 1,
                      image_size: int = 0, batch_size: int = 16):
    """`piflow shards latents` as a function (the digits demo calls it): returns the pool's report."""
    from data_pipeline.latents.shards import latent_tasks
    from data_pipeline.shards import resolve_shards

    tasks = latent_tasks(resolve_shards(images), out)
    factory = functools.partial(latent_worker, cfg, flip, seed, image_size, batch_size)
    return _run_pool(cfg, tasks, factory, workers, "latents", "image")


def add_encode(ss: argparse._SubParsersAction) -> None:
    p = ss.add_parser("encode", help="pre-encode prompt shards with the config's text encoders over a Ray actor "
                                     "pool (emb.safetensors beside txt; bf16 or fp8), resumable")
    p.add_argument("url", help="source shards (prompt or latent shards)")
    p.add_argument("--out", required=True, help="output dir or s3://bucket/prefix (existing shards are skipped)")
    p.add_argument("--config", required=True, help="run config whose model section names the text encoders")
    p.add_argument("--dtype", choices=["bf16", "fp8", "float32"], default="bf16",
                   help="storage of the embeddings: bf16, fp8 (e4m3 with a per-tensor scale) or float32")
    p.add_argument("--workers", type=int, default=0, help="actors, each loads the encoders once (0 = data.workers)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    def run(args: argparse.Namespace) -> int:
        from data_pipeline import storage
        from data_pipeline.shards import resolve_shards
        from trainer.config import load_config

        cfg = load_config(args.config, args.overrides)
        urls = resolve_shards(args.url)
        storage.makedirs(args.out)
        tasks = [(u, storage.join(args.out, storage.basename(u))) for u in urls]
        workers = args.workers or cfg.data.workers
        rep = _run_pool(cfg, tasks, functools.partial(encode_worker, cfg, args.dtype), workers, "encode", "prompt")
        n_bad = _report_bad(rep.done)
        per = sum(int(d.get("emb_bytes", 0)) for d in rep.done) / max(rep.samples, 1)
        print(f"encoded {rep.samples} prompts into {len(rep.done)} shards at {args.out} ({len(rep.skipped)} shards "
              f"existed already, {n_bad} bad records skipped, {per:.0f} embedding bytes/prompt as {args.dtype}, "
              f"{rep.seconds:.1f} s)")
        return 1 if n_bad else 0

    p.set_defaults(func=run)


def add_latents(ss: argparse._SubParsersAction) -> None:
    p = ss.add_parser("latents", help="encode image shards with the family's VAE into latent shards "
                                      "(data-based pi-ID), over a Ray actor pool, resumable")
    p.add_argument("url", metavar="IMAGES_URL", help="image shards: dir/prefix, .tar, brace pattern or list "
                   "(KEY.png|jpg|webp|npy + KEY.txt caption or KEY.cls class id)")
    p.add_argument("--out", required=True, help="output dir or s3://bucket/prefix (existing shards are skipped)")
    p.add_argument("--config", required=True, help="run config: model.family and its VAE (model.pretrained)")
    p.add_argument("--flip", choices=["none", "random", "both"], default="none",
                   help="horizontal flip: none, random (per image, by key), both (image and mirror)")
    p.add_argument("--image-size", type=int, default=0, help="center-crop and resize to this size (0 = as is)")
    p.add_argument("--seed", type=int, default=0, help="seeds the posterior samples and the flip coin")
    p.add_argument("--workers", type=int, default=0, help="actors (0 = data.workers)")
    p.add_argument("--batch-size", type=int, default=16, help="images per VAE call")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    def run(args: argparse.Namespace) -> int:
        from trainer.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.image_size < 0 or args.batch_size < 1:
            raise SystemExit("piflow shards latents: --image-size must be >= 0 and --batch-size >= 1")
        rep = latent_shards_job(cfg, args.url, args.out, args.flip, args.seed, args.workers or cfg.data.workers,
                                args.image_size, args.batch_size)
        n_bad = _report_bad(rep.done)
        print(f"wrote {rep.samples} latents in {len(rep.done)} shards to {args.out} "
              f"({len(rep.skipped)} shards existed already, {n_bad} bad records skipped, {rep.seconds:.1f} s)")
        return 1 if n_bad else 0

    p.set_defaults(func=run)
