"""Issue 23 item 3: bf16 everywhere in a bf16 run. Every matrix multiply (and attention) of a bf16 student step
through the real engine (DeepSpeed ZeRO-3 over gloo, 2 ranks, the rank program) takes bf16 inputs: the frozen
base, the LoRA A/B matrices, the GM head and `norm_out`, forward and backward, and the teacher's forwards in
both placements (shared: the student's trunk with the adapters off; separate: a TeacherServer, here in the
rank's process). The recipe's `model.dtype: float32` does not leave an fp32 teacher in a bf16 run. The
masters stay float32 (the optimiser's), and the policy math is float32 by design (DESIGN.md §3): it has no
matrix multiply, so no exception needs naming."""
from __future__ import annotations

import pytest

from tests.trainer.ds_spawn import run_ranks
from tests.trainer.speed_workers import one_step, tiny_cfg

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(900)]


@pytest.mark.parametrize("placement", ["shared", "separate"])
def test_every_matmul_of_a_bf16_zero3_step_is_bf16(placement):
    cfg = tiny_cfg("flux", batch=4, engine="deepspeed", world=2, train={"precision": "bf16"},
                   model={"dtype": "float32"}, teacher={"placement": placement, "overlap": False})
    for r in run_ranks(one_step, 2, cfg, "server", True, timeout=800):
        counts, other = r["dtypes"]["counts"], r["dtypes"]["other"]
        assert other == {}, f"rank {r['rank']}: matmuls not in bf16: {other}"
        assert counts.get("mm bfloat16", 0) > 100 and counts.get("addmm bfloat16", 0) > 0
        assert any(k.startswith("_scaled_dot_product") for k in counts)
        assert r["record"]["teacher/calls"] == 2 and r["record"]["loss"] > 0
