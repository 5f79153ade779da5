"""Issue 23's communication bars, measured: `benchmarks/comm_volume.py --tiny` (the FLUX recipe as rehearsed on
4 gloo ranks = 2 loopback nodes of 2, every torch.distributed collective counted) written to a temporary path."""
from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from benchmarks.comm_volume import main

    out = tmp_path_factory.mktemp("comm_volume") / "comm_volume.json"
    assert main(["--tiny", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _row(measured, frozen):
    return next(r for r in measured["rows"] if r["frozen_weights"] == frozen)


def test_counts_are_attributed_and_equal_on_every_rank(measured):
    for r in measured["rows"]:
        assert r["resolved"] == [r["frozen_weights"], r["trainable_comm"]]
        assert r["unattributed_gathers"] == 0 and r["ranks_agree"] and r["iterations"] == 2
        assert r["per_iteration"].get("gather_other", 0) == 0  # every iteration gather is a parameter's


def test_replicated_base_is_never_gathered_and_total_is_within_3x_the_trainables(measured):
    bars = measured["bars"]["4"]
    rep = _row(measured, "replicate")
    assert rep["per_iteration"].get("gather_frozen", 0.0) == 0 and bars["replicate_pass"]
    # per_step: one gather and one reduce-scatter of the trainables per iteration
    assert bars["replicate_total_over_trainable"] <= 3
    assert rep["per_iteration"]["reduce_scatter"] >= rep["trainable_bytes"]
    shard = _row(measured, "shard")
    assert shard["per_iteration"]["gather_frozen"] >= shard["frozen_bytes"]  # at least one pass a segment


def test_replicate_trains_like_shard(measured):
    """In float32 (the bf16 rows round the two layouts' gradient sums differently: benchmarks/comm_volume.py)."""
    bars = measured["bars"]["4"]
    assert bars["losses_pass"] and bars["replicate_vs_shard_loss_diff"] <= 1e-5
    fp32 = [r for r in measured["rows"] if r["precision"] == "fp32"]
    assert sorted(r["frozen_weights"] for r in fp32) == ["replicate", "shard"]
    assert all(len(r["losses"]) == 2 for r in fp32) and fp32[0]["losses"] != _row(measured, "replicate")["losses"]


def test_node_sharded_base_never_crosses_nodes(measured):
    node = _row(measured, "shard_in_node")
    assert node["per_iteration"]["gather_frozen"] > 0  # it is gathered, within the node
    assert node["per_iteration"].get("gather_frozen_cross_node", 0.0) == 0 and measured["bars"]["4"]["shard_in_node_pass"]
    shard = _row(measured, "shard")
    assert shard["per_iteration"]["gather_frozen_cross_node"] == shard["per_iteration"]["gather_frozen"] > 0


def test_each_rank_holds_its_planned_share_of_the_frozen_base(measured):
    for frozen, share in (("replicate", 1), ("shard_in_node", 2), ("shard", 4)):
        r = _row(measured, frozen)
        held = r["memory_bytes"]["weights_frozen"]
        assert r["frozen_bytes"] / share <= held <= r["frozen_bytes"] / share + 4096, (frozen, held)


def test_the_planner_predicts_the_measured_bytes(measured):
    """`piflow plan`'s bytes (trainer/planner/time_plan.py) for the same config equal the measured ones: every layout
    without prefetch, and the replicated base (nothing of it is gathered, prefetch or not)."""
    keys = ("gather_frozen", "gather_trainable", "reduce_scatter", "gather_frozen_cross_node")
    compared = 0
    for r in measured["rows"]:
        if r["prefetch_blocks"] == 0 or r["frozen_weights"] == "replicate":
            assert {k: r["planned"][k] for k in keys} == {k: r["per_iteration"].get(k, 0.0) for k in keys}
            compared += 1
    assert compared == 3 and measured["bars"]["4"]["planner_pass"]  # bf16: 2 rows; fp32 (the loss check): 1


def test_building_the_student_broadcasts_no_frozen_weight(measured):
    """Issue 21 item 7: the frozen base read from model.pretrained is not broadcast while it is built."""
    for r in measured["rows"]:
        assert r["setup"].get("broadcast", 0.0) <= r["trainable_bytes"] + 1024 < r["frozen_bytes"]
    assert measured["bars"]["4"]["setup_broadcast_pass"]
