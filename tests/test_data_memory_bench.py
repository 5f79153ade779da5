"""`benchmarks/data_memory.py --tiny` (issue 22) as the suite runs it: a fresh process, the loopback S3 server,
2 DataWorkers, a BatchFeed and 2 consumer actors per shard size and dtype; its JSON goes to a temp path."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_tiny_data_memory_benchmark_measures_every_configuration(tmp_path):
    out = tmp_path / "data_memory.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_memory.py"), "--tiny", "--out", str(out)],
                          cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=850)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["dtype"], r["shard_samples"]) for r in rows] == [(d, n) for d in ("fp8", "bf16") for n in (5, 20, 80)]
    for r in rows:
        # the consumers got the embeddings as stored, and every process was measured
        assert r["dtypes_at_consumer"] == (["float8_e4m3fn"] if r["dtype"] == "fp8" else ["bfloat16"])
        assert set(r["peak_rss_gib"]) == {"worker0", "worker1", "feed", "consumer0", "consumer1"}
        assert all(0.05 < v < 2.0 for v in r["peak_rss_gib"].values())
        assert r["samples"] == 2 * 24 and r["samples_per_s_per_consumer"] > 0
        # what crossed Ray per sample: its stored bytes, plus keys, prompts and handles (a few KB at most)
        assert r["stored_bytes_per_sample"] < r["ray_bytes_per_sample"] < r["stored_bytes_per_sample"] + 4096
    # the rate bar's yardstick is the planned FLUX iteration: 64 prompts over 16 GPUs in `piflow plan`'s seconds
    plan = report["consumption"]
    assert plan["cluster"] == "2x8xH100" and plan["prompts_per_gpu"] == 4 and 10 < plan["planned_step_s"] < 60
    assert report["per_rank_consumption_samples_per_s"] == pytest.approx(4 / plan["planned_step_s"])
