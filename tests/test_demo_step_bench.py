"""`benchmarks/demo_step.py` (the demo's data-free step on 2 gloo ranks through the real rank program): what a
ZeRO-3 step with the trainables kept gathered (`train.trainable_comm: per_step`, the demo's resolved layout)
communicates. The trainables are gathered once per step and reduce-scattered once: no per-module fetch re-gathers
them in a forward or a backward (before the engine removed ZeRO-3's module hooks from gathered modules, the same
step gathered 4.8x the trainable bytes in 249 calls, and cost a rank more CPU than the whole forward and
backward)."""
from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]


def test_the_demo_step_gathers_its_trainables_once_per_step(tmp_path):
    from benchmarks.demo_step import main

    out = tmp_path / "demo_step.json"
    assert main(["--iters", "3", "--warmup", "2", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    coll = row["collectives_per_step"]
    trainable_bytes = row["trainable_params"] * 4  # fp32 demo; ZeRO-3 pads the flat partition by < world elements
    gather, scatter = coll["all_gather_into_tensor"], coll["reduce_scatter_tensor"]
    assert trainable_bytes <= gather["bytes"] <= trainable_bytes + 2 * 4, gather
    assert trainable_bytes <= scatter["bytes"] <= trainable_bytes + 2 * 4 and scatter["calls"] == 1, scatter
    # one all-gather per trainable tensor at most (the optimizer step's re-gather), none per module call
    assert gather["calls"] <= row["trainable_tensors"], (gather, row["trainable_tensors"])
    assert row["forwards_per_step"] == 4 and row["backwards_per_step"] == 4  # 4 segments, 1 micro-batch
    assert row["cpu_per_step_s"]["step"] > 0
