"""Prompt streaming throughput from an S3 server on loopback: in-process PromptStream and 1 / 2 DataWorkers,
side by side with the training consumption rate (prompts/s the trainer eats; pass the demo's measured value).

    .venv/bin/python benchmarks/data_throughput.py [--prompts 20000] [--consume-rate 200]

Prints a table and writes benchmarks/results/data_throughput.json. The bar (issue 5): streaming must exceed
consumption by at least 10x.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(stream, batches: int) -> float:
    next(stream)  # warm-up: first shard fetch, actor start
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(stream))
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20000)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=60, help="timed batches per configuration")
    ap.add_argument("--consume-rate", type=float, default=200.0,
                    help="training consumption in prompts/s (default: a placeholder until the demo is measured)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_throughput.json"))
    args = ap.parse_args()

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Fake credentials: moto on loopback accepts any. Set before ray.init so the workers inherit them.
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from data_pipeline.shards import build_shards
    from data_pipeline.stream import PromptStream

    words = "a photo of red blue green small large cat dog house tree river mountain at night in the snow".split()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "prompts.txt"
        src.write_text("".join(" ".join(words[(i * k) % len(words)] for k in range(1, 12)) + f" #{i}\n"
                               for i in range(args.prompts)))
        url = "s3://bench-prompts/shards"
        build_shards(str(src), url, per_shard=args.per_shard, progress=False)

    rows = []
    s = PromptStream(url, args.batch_size, seed=0)
    rows.append(("PromptStream (in-process)", 0, measure(s, args.batches)))
    s.close()

    import ray

    from cluster.data_worker import DataWorkerPool

    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        for workers in (1, 2):
            pool = DataWorkerPool(url, args.batch_size, seed=0, num_workers=workers, prefetch=2)
            rows.append(("DataWorkerPool", workers, measure(pool, args.batches)))
            pool.shutdown()
    finally:
        ray.shutdown()
        server.stop()

    print(f"\nprompt streaming from S3 on loopback ({args.prompts} prompts, {args.per_shard}/shard, "
          f"batch {args.batch_size}; {os.cpu_count()} CPUs)")
    print(f"{'reader':28s} {'workers':>7s} {'prompts/s':>12s} {'x consume':>10s} {'>=10x':>6s}")
    results = []
    for name, workers, rate in rows:
        ratio = rate / args.consume_rate
        print(f"{name:28s} {workers:7d} {rate:12.0f} {ratio:10.1f} {'yes' if ratio >= 10 else 'NO':>6s}")
        results.append({"reader": name, "workers": workers, "prompts_per_s": rate, "ratio_to_consumption": ratio})
    print(f"{'training consumption':28s} {'':7s} {args.consume_rate:12.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"consume_rate_prompts_per_s": args.consume_rate, "prompts": args.prompts,
                               "per_shard": args.per_shard, "batch_size": args.batch_size,
                               "cpus": os.cpu_count(), "python": platform.python_version(),
                               "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
