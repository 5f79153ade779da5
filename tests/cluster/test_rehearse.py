"""`piflow rehearse` on every production recipe (issue 21, tier `slow`): the recipe as written plus the documented
shrink only, run as a user would (a subprocess of the CLI): shards built (and encoded, or VAE latents for the
data-based ImageNet recipe), 2 ZeRO-3 ranks under Ray Train with the recipe's engine, precision and
checkpointing, a rank SIGKILLed after the first checkpoint, the group restarted and resumed, the re-done step's
loss equal to the killed attempt's, export and sample, wandb offline files, and the recipe's full-scale plan.
The short version: 4 steps, the fewest with a checkpoint, a killed step after it and a resumed step."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.recipes import RECIPES, ROOT
from trainer.rehearsal.shrink import SHRINK_KEYS



def test_bad_input_is_one_line_before_anything_is_written_or_deleted(tmp_path, capsys):
    from cluster.cli import main

    work = tmp_path / "work"
    work.mkdir()
    (work / ".piflow-rehearsal").write_text("")
    (work / "earlier.txt").write_text("an earlier rehearsal")
    cases = [([RECIPES["flux"], "--steps", "3"], "--steps 3: a rehearsal needs at least 4"),
             (["configs/digits_demo.yaml"], "model.family='digits'"),
             ([RECIPES["flux"], "optim.lr=-1"], "optim.lr"),
             ([RECIPES["flux"], "--workdir", str(tmp_path)], "is not a rehearsal's directory")]
    for args, message in cases:
        if "--workdir" not in args:
            args = [*args, "--workdir", str(work)]
        assert main(["rehearse", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert (work / "earlier.txt").exists() and not (work / "hub").exists()  # nothing cleared, nothing written


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.distributed
@pytest.mark.timeout(2700)
@pytest.mark.parametrize("family", ["flux", "qwen_image", "dit", "wan"])
def test_piflow_rehearse_passes_for_the_recipe(family, tmp_path):
    work, report_file = tmp_path / "work", tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_", "RAY_ADDRESS"))}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "rehearse", RECIPES[family], "--steps", "4",
                        "--workdir", str(work), "--json", str(report_file)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=2600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    report = json.loads(report_file.read_text())
    assert report["passed"] and f"piflow rehearse {RECIPES[family]}: PASS" in r.stdout
    # nothing but the documented shrink changed (the hub id's weights are listed, the id itself stays)
    changes = {c["key"]: c for c in report["changes"]}
    assert set(changes) <= SHRINK_KEYS and all(c["kind"] != "override" for c in changes.values())
    if family != "dit":
        assert changes["model.pretrained"]["rehearsal"].startswith(changes["model.pretrained"]["recipe"])
    # 4 finite steps, one rank killed after the step-2 checkpoint, step 3 re-done with the same loss
    losses = report["losses"]
    assert sorted(map(int, losses)) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert report["killed"]["pid"] > 0 and report["killed"]["checkpoint"] == 2
    resume = report["resume"]
    assert resume["exact"] and resume["resumed_from_step"] == 2 and 3 in resume["redone_steps"]
    assert resume["max_rel_diff"] <= 1e-6 and resume["resumed_from"].endswith("step_00000002")
    # the export samples; the clip of the video recipe is an animation
    sample = report["sample"]
    assert sample["finite"] and sample["std"] > 0.01
    head = open(sample["file"], "rb").read(8)
    assert head.startswith(b"GIF8") if family == "wan" else head == b"\x89PNG\r\n\x1a\n"
    assert list((work / "wandb").glob("offline-run-*"))  # wandb as the recipe says: offline here
    assert report["plan"] and any("this config" in line and "FITS" in line for line in report["plan"])
