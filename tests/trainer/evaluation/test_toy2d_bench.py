"""The toy benchmarks' bookkeeping (issue 16): cached 256-step teacher sets, merging re-measured rows into an
existing result file, and the digits step-count bars."""
import json

import torch

from benchmarks.digits_nfe import bars as digits_bars, elastic_ratios
from benchmarks.toy2d import merge_json
from models.families.toy2d import ToyVelocityNet
from trainer.evaluation.toy2d import MethodResult, bars, teacher_sets


def _teacher():
    torch.manual_seed(0)
    net = ToyVelocityNet(hidden_dim=16, num_layers=1).eval().requires_grad_(False)
    return lambda x, s, cond: net(x, s)


def test_teacher_sets_cache_round_trip_gives_the_same_sets_and_floor(tmp_path):
    cache = tmp_path / "sets.safetensors"
    first = teacher_sets(_teacher(), 64, 2, progress=False, cache=cache)
    assert cache.exists()
    calls = []
    second = teacher_sets(lambda *a: calls.append(1), 64, 2, progress=False, cache=cache)  # never called
    assert not calls
    assert torch.equal(first.reference, second.reference) and first.floor == second.floor
    assert first.floor > 0 and len(second.floor_sets) == 2


def _row(method, nfe, ed, off, key=""):
    return MethodResult(method, nfe, ed, 0.0, ed / 0.002, 8.0, off, 0.01, key=key)


def test_merge_replaces_remeasured_and_legacy_rows_and_keeps_the_rest(tmp_path):
    path = tmp_path / "toy2d.json"
    old = [dict(_row("GM pi-ID (K=8)", 4, 8e-4, 0.003).__dict__), dict(_row("DX pi-ID (N=10)", 4, 5e-3, 0.16).__dict__)]
    for r in old:
        r.pop("key")  # files written before issue 16 have no keys
    path.write_text(json.dumps({"meta": {"ed_noise_floor": 0.002}, "bars": {"gm4_all_modes": True}, "methods": old}))
    new = [_row("DX pi-ID grid (N=10, window 3, lr 0.001)", 4, 2e-3, 0.01, key="dx4"),
           _row("DX pi-ID polynomial (P=10, window 3, lr 0.001)", 4, 4e-3, 0.08, key="dxp4")]
    new_bars = bars({r.key: r for r in new}, 0.002, 8)
    assert new_bars == {"dx4_off_mode_le_0.05": True, "dx4_ed_within_1.5x_floor": True,
                        "dxp4_off_mode_le_0.05": False, "dxp4_ed_within_1.5x_floor": False}
    merge_json(path, new, new_bars, {"ed_noise_floor": 0.0021})
    data = json.loads(path.read_text())
    methods = [(m["method"], m.get("key")) for m in data["methods"]]
    assert ("DX pi-ID (N=10)", None) not in methods  # the legacy DX row is replaced
    assert ("GM pi-ID (K=8)", None) in methods and ("DX pi-ID grid (N=10, window 3, lr 0.001)", "dx4") in methods
    assert data["bars"]["gm4_all_modes"] is True and data["bars"]["dxp4_off_mode_le_0.05"] is False
    assert all(m["ed_noise_floor"] == 0.0021 for m in data["methods"] if m.get("key"))
    merge_json(path, new[:1], {}, {"ed_noise_floor": 0.0021})  # re-measuring again does not duplicate
    assert sum(m.get("key") == "dx4" for m in json.loads(path.read_text())["methods"]) == 1


def test_digits_step_count_bars():
    def row(trained, nfe, fd, acc, jitter=0.0):
        return {"trained_nfe": trained, "nfe": nfe, "frechet_distance": fd, "prompt_accuracy": acc,
                "boundary_jitter": jitter}

    teacher = row(0, 32, 4.0, 0.99)
    grid = [row(4, 4, 3.5, 0.99), row(4, 8, 4.0, 0.99)]  # the grid-trained student: reported, not barred
    good = [teacher, row(1, 1, 7.9, 0.965), row(2, 2, 5.9, 0.99), *grid, row(4, 4, 3.5, 0.99, 0.4),
            row(4, 8, 3.8, 0.99, 0.4)]
    assert all(digits_bars(good).values()) and len(digits_bars(good)) == 4
    assert elastic_ratios(good) == {"boundary_jitter_0": 4.0 / 3.5, "boundary_jitter_0.4": 3.8 / 3.5}
    bad = [teacher, row(1, 1, 8.1, 0.95), row(2, 2, 6.1, 0.99), *grid, row(4, 4, 3.5, 0.99, 0.4),
           row(4, 8, 3.9, 0.99, 0.4)]
    assert not any(digits_bars(bad).values())
