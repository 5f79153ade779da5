"""Node-local scratch (issue 11): checkpoint staging goes under run.scratch, and a save checks the free space
there first: too little stops with one line naming the path and the bytes needed, before anything is staged,
and the previous checkpoint stays the newest valid one."""
from __future__ import annotations

import os
import shutil
from collections import namedtuple

import pytest

from tests.trainer.checkpoint.test_checkpoint import make_state
from trainer.checkpoint.store import latest_valid, staging_bytes_estimate
from trainer.config import config_from_dict
from trainer.checkpoint.resume import make_manager, save_state
from trainer.scratch import ScratchSpaceError


def test_staging_lives_under_run_scratch(tmp_path):
    cfg = config_from_dict({"run": {"output": str(tmp_path / "out"), "scratch": str(tmp_path / "node")}})
    manager = make_manager(cfg, rank=0, world_size=1)
    assert manager.staging.startswith(str(tmp_path / "node") + os.sep)
    manager.close()


def test_too_little_scratch_space_is_a_clear_error_naming_path_and_bytes(tmp_path, monkeypatch):
    cfg = config_from_dict({"run": {"output": str(tmp_path / "out"), "scratch": str(tmp_path / "node")},
                            "ema": {"start": 0}})
    module, engine, ema = make_state(cfg)
    manager = make_manager(cfg, rank=0, world_size=1)
    save_state(cfg, manager, 1, engine, ema, module)
    manager.wait()
    assert latest_valid(cfg.run.output).step == 1
    staged = manager._staged_bytes  # what step 1 really staged
    assert staged > 0
    # the params of this model: 3*4+4 + 4*2+2 = 26 fp32 values; weights + 2 moments + EMA, +10%
    assert staging_bytes_estimate(engine, ema) == int(26 * 4 * 4 * 1.1)

    Usage = namedtuple("Usage", "total used free")
    real = shutil.disk_usage

    def small_disk(path):  # test double: the node's scratch disk is almost full
        u = real(path)
        return Usage(u.total, u.used, 100) if str(path).startswith(str(tmp_path / "node")) else u

    monkeypatch.setattr("trainer.scratch.shutil.disk_usage", small_disk)
    with pytest.raises(ScratchSpaceError) as e:
        save_state(cfg, manager, 2, engine, ema, module)
    msg = str(e.value)
    assert "\n" not in msg and "run.scratch" in msg and manager.staging in msg
    assert f"needs {max(staged, staging_bytes_estimate(engine, ema))} bytes" in msg and "only 100" in msg
    assert not os.path.exists(os.path.join(manager.staging, "step_00000002"))
    manager.close()
    assert latest_valid(cfg.run.output).step == 1
