"""Every `piflow` error is one line on stderr, the traceback only with --debug (issue 12): missing or empty
inputs of `sample`, `export` and `shards inspect`, a bad config value, an error deep inside a command."""
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv, expected", [
    (["export", "{missing}", "--out", "{tmp}/x"], "piflow export: RUN_OR_CHECKPOINT {missing} does not exist"),
    (["export", "{empty}", "--out", "{tmp}/x"], "piflow export: RUN_OR_CHECKPOINT {empty} is an empty directory"),
    (["sample", "{missing}", "--out", "{tmp}/x.png"], "piflow sample: DIR_OR_RUN {missing} does not exist"),
    (["sample", "{empty}", "--out", "{tmp}/x.png"], "piflow sample: DIR_OR_RUN {empty} is an empty directory"),
    (["shards", "inspect", "{missing}"], "piflow shards: shards {missing} does not exist"),
    (["shards", "inspect", "{empty}"], "piflow shards: shards {empty} is an empty directory"),
    (["export", "{junk}", "--out", "{tmp}/x"], "piflow export: {junk}: neither a checkpoint"),
    (["train", "{root}/configs/toy2d.yaml", "train.ckpt_every=0"],
     "piflow: config error: {root}/configs/toy2d.yaml: key 'train.ckpt_every': 0 is outside [1, 1e9]"),
])
def test_errors_are_one_line(argv, expected, tmp_path, capsys):
    paths = {"tmp": str(tmp_path), "missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty"),
             "junk": str(tmp_path / "junk"), "root": str(ROOT)}
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a run")
    code = main([a.format(**paths) for a in argv])
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and err.startswith(expected.format(**paths)), err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "shards", "inspect", str(tmp_path / "nope"), "--debug"],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr and "does not exist" in proc.stderr
