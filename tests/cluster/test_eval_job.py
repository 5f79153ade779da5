"""`piflow eval` on a digits export (the committed digits teacher, a student built from it): a Ray job that
generates paired student / teacher images, scores them with the digit classifier's features, writes
results.json, table.md and one labelled grid per prompt, and serves the teacher from its cache on a rerun."""
from __future__ import annotations

import json

import pytest
import torch

from cluster.cli import main
from tests.cluster.test_shard_jobs import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    from models.pipeline import PiFlowPipeline, PiFlowStudent
    from trainer.config import load_config

    cfg = load_config(ROOT / "configs" / "digits_demo.yaml", [f"model.pretrained={ROOT / 'assets/teachers/digits'}",
                                                                "wandb.mode=disabled"])
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("export")
    PiFlowPipeline.from_student(PiFlowStudent(piflow=cfg.to_dict(), kind="full")).save_pretrained(str(out))
    return out


def test_eval_job_scores_writes_and_caches_the_teacher(tmp_path, digits_export, ray_local, capsys):
    from trainer.evaluation.generate import Generator, teacher_euler
    from trainer.evaluation.features import DigitsFeatures
    from trainer.evaluation.metrics import fid

    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten one\na handwritten seven\na handwritten zero\n")
    args = ["eval", str(digits_export), "--prompts", str(prompts), "--nfe", "2", "--teacher-steps", "8",
            "--seeds", "5", "--name", "t"]
    assert main(args) == 0
    out = digits_export / "eval" / "t"
    res = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["teacher 8-step", "teacher 2-step (Euler)", "student 2-step"]
    assert res["generated"] == {"teacher 8-step": 15, "teacher 2-step (Euler)": 15, "student 2-step": 15}
    assert sorted(p.name for p in (out / "grids").glob("*.png")) == [
        "000-a-handwritten-one.png", "001-a-handwritten-seven.png", "002-a-handwritten-zero.png"]
    # the job's FID of the teacher's 2-step Euler vs its 8 steps, recomputed independently from the teacher
    gen = Generator(str(digits_export))
    rows_p = [p for p in ("a handwritten one", "a handwritten seven", "a handwritten zero") for _ in range(5)]
    seeds = [s for _ in range(3) for s in range(5)]
    teacher = gen.family.build_teacher(gen.cfg)
    cond = gen.pipe.encode_prompt(rows_p)
    x8, x2 = (gen.images(teacher_euler(teacher, gen.noise(rows_p, seeds), cond, k, gen.cfg.distill.shift))
              for k in (8, 2))
    net = DigitsFeatures()
    euler = next(r for r in res["rows"] if r["method"] == "teacher 2-step (Euler)")
    assert euler["fid_vs_teacher"] == pytest.approx(fid(net, x8, x2), rel=1e-4, abs=1e-6)
    assert all(0 <= r["prompt_accuracy"] <= 1 and r["diversity"] > 0 for r in res["rows"])
    # a rerun takes the teacher's images from the cache and generates only the student
    assert main(args) == 0
    res2 = json.loads((out / "results.json").read_text())
    assert res2["generated"] == {"teacher 8-step": 0, "teacher 2-step (Euler)": 0, "student 2-step": 15}
    assert res2["rows"] == res["rows"]
