"""`piflow demo` / `make demo` (issue 24): the data-free student by default; `--students data-based`
(`make demo-data`) trains the data-based one and shows it beside the data-free student of an earlier run;
a data-based export left by an older run is never reported by `make demo`.

Training, export and the latent-shards job are replaced by test doubles (they are exercised by the distributed
and Ray tests); the command line, the phases, the prompt shards and the choice of students are real."""
from __future__ import annotations

from pathlib import Path

import pytest

import cluster.demo as demo
from cluster.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _exported(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "model_index.json").write_text("{}")


def test_exports_to_evaluate_skips_a_stale_data_based_student(tmp_path):
    _exported(tmp_path / "export")
    _exported(tmp_path / "export_data")  # left behind by an older run
    assert set(demo.exports_to_evaluate(tmp_path, ("data-free",))) == {"data-free"}
    assert demo.exports_to_evaluate(tmp_path, ("data-based",)) == {"data-free": tmp_path / "export",
                                                                    "data-based": tmp_path / "export_data"}
    (tmp_path / "export" / "model_index.json").unlink()
    assert set(demo.exports_to_evaluate(tmp_path, ("data-based",))) == {"data-based"}
    assert demo.exports_to_evaluate(tmp_path, ("data-free",)) == {}


@pytest.fixture
def doubles(monkeypatch):
    """Test doubles for the expensive phases: they record what they were given and write an export marker."""
    seen = {"trained": [], "evaluated": None}
    import cluster.launch
    import trainer.evaluation.digits
    import trainer.export.pipeline

    def fake_launch(cfg, config_path=None):
        seen["trained"].append(("data-free" if cfg.distill.data_free else "data-based", cfg.run.output))

    def fake_export(run_output, export_dir):
        _exported(Path(export_dir))

    def fake_evaluate(cfg, export_dir, out, samples_per_digit, data_export_dir=None):
        import torch

        seen["evaluated"] = (export_dir, data_export_dir)
        seen["eval_threads"] = torch.get_num_threads()
        return {"rows": [], "bars": {"ok": True}, "table": "| table |", "outputs": {}}

    monkeypatch.setattr(cluster.launch, "launch_training", fake_launch)
    monkeypatch.setattr(trainer.export.pipeline, "export_student", fake_export)
    monkeypatch.setattr(trainer.evaluation.digits, "evaluate_demo", fake_evaluate)
    monkeypatch.setattr(demo, "build_latent_shards", lambda cfg, out: str(out / "latents"))
    return seen


def test_make_demo_trains_only_the_data_free_student(tmp_path, doubles):
    import torch

    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    _exported(out / "export_data")  # a data-based student from an older run: not trained, not shown
    overrides = [f"run.output={out / 'run'}", f"data.shards={tmp_path / 'shards'}",
                 f"model.pretrained={ROOT / 'assets' / 'teachers' / 'digits'}"]
    try:
        assert main(["demo", *overrides]) == 0
        # the evaluation runs on one intra-op thread (2 spun on a loaded 2-core machine), then the setting is back
        assert doubles["eval_threads"] == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert doubles["trained"] == [("data-free", str(out / "run"))]
    assert doubles["evaluated"] == (out / "export", None)
    assert any(p.suffix == ".tar" for p in (tmp_path / "shards").iterdir())  # the real prompt shards phase ran


def test_make_demo_data_adds_the_data_based_student_beside_the_earlier_data_free_one(tmp_path, doubles, capsys):
    out = tmp_path / "demo"
    _exported(out / "export")  # from an earlier `make demo`
    overrides = [f"run.output={out / 'run'}", f"data.shards={tmp_path / 'shards'}",
                 f"model.pretrained={ROOT / 'assets' / 'teachers' / 'digits'}"]
    assert main(["demo", "--students", "data-based", *overrides]) == 0
    assert doubles["trained"] == [("data-based", str(out / "run_data"))]
    assert doubles["evaluated"] == (out / "export", out / "export_data")
    assert f"the data-free student: reused from {out / 'export'}" in capsys.readouterr().out
