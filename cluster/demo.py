"""`piflow demo`: the embedded default end to end (DESIGN.md §9, issue 8).

A tiny FLUX-architecture digits teacher (committed under assets/, reproduced by `piflow teacher
configs/digits_demo.yaml --force`) is distilled into a 4-step GM student through the full stack: prompt shards
in a local object store, local Ray with DataWorkers, a TeacherServer actor, 2 DeepSpeed ZeRO-3 student ranks,
checkpoints and rollouts under the run directory, wandb offline. The EMA student is exported in the diffusers
format, loaded back through `PiFlowPipeline`, and scored beside the teacher.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from trainer.config import Config, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_demo.yaml"


class Phases:
    """Wall time per phase, printed as it goes and summarised at the end."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def run(self, name: str, fn, *args, **kwargs):
        print(f"\n== {name}", flush=True)
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - t
        print(f"== {name}: {self.seconds[name]:.1f} s", flush=True)
        return out

    @property
    def total(self) -> float:
        return time.perf_counter() - self._t0


def build_prompt_shards(cfg: Config, repeats: int) -> str:
    """Digit prompts (every digit `repeats` times, unique keys) as webdataset shards at `data.shards`."""
    import tempfile

    from data_pipeline import storage
    from data_pipeline.digits import digit_prompts
    from data_pipeline.shards import build_shards

    out = cfg.data.shards
    if "{" in out or out.endswith(".tar"):
        raise ValueError(f"data.shards: the demo builds its shards into a directory, got {out!r}")
    if storage.exists(out) and any(n.endswith(".tar") for n in storage.listdir(out)):
        print(f"reusing the prompt shards in {out}")
        return out
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "prompts.txt"
        src.write_text("\n".join(digit_prompts(repeats)) + "\n")
        build_shards(str(src), out, per_shard=max(10, repeats * 10 // 4), normalize=True, dedup=False)
    return out


def run_demo(config: str | None = None, overrides: list[str] | tuple[str, ...] = (), samples_per_digit: int = 100
             ) -> dict:
    # A demo starts fresh (`run.force`); a later override can turn that off to resume.
    cfg = load_config(config or DEFAULT_CONFIG, ["run.force=true", *overrides])
    from data_pipeline import storage

    # the report, grids and the export the evaluation loads are local; with run.output on s3:// (issue 11)
    # they go to node-local scratch and the export is also uploaded to <run.output>/export
    if storage.is_s3(cfg.run.output):
        from trainer.scratch import run_scratch

        out = Path(run_scratch(cfg, "demo"))
    else:
        out = Path(cfg.run.output).parent
    phases = Phases()

    from trainer.teachers import ensure_teacher

    teacher_dir = phases.run("teacher (committed, or trained once)", ensure_teacher, cfg)
    print(f"teacher: {teacher_dir}")
    phases.run("prompt shards", build_prompt_shards, cfg, 64)

    from cluster.launch import launch_training

    phases.run("distillation (Ray + 2 ZeRO-3 ranks + TeacherServer + DataWorkers)", launch_training, cfg)

    from trainer.export import export_student

    export_dir = out / "export"
    phases.run("export (EMA, diffusers format)", export_student, cfg.run.output, export_dir)
    if storage.is_s3(cfg.run.output):
        phases.run("export upload", storage.upload_dir, str(export_dir), storage.join(cfg.run.output, "export"))

    from trainer.digits_eval import evaluate_demo

    report = phases.run("evaluation", evaluate_demo, cfg, export_dir, out, samples_per_digit)
    report["phases_s"] = phases.seconds
    report["total_s"] = phases.total
    (out / "demo_results.json").write_text(json.dumps(report, indent=1))
    print("\n" + report["table"])
    print(f"\nbars: {json.dumps(report['bars'])}")
    print(f"\ntotal {phases.total / 60:.1f} min. Outputs:")
    for name, path in report["outputs"].items():
        print(f"  {name:<22} {path}")
    return report
