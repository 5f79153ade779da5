"""`piflow demo`: the embedded default end to end (DESIGN.md §9, issue 8).

A tiny FLUX-architecture digits teacher (committed under assets/, reproduced by `piflow teacher
configs/digits_demo.yaml --force`) is distilled into a 4-step GM student through the full stack: prompt shards
in a local object store, local Ray with DataWorkers, a TeacherServer actor, 2 DeepSpeed ZeRO-3 student ranks,
checkpoints and rollouts under the run directory, wandb offline. The EMA student is exported in the diffusers
format, loaded back through `PiFlowPipeline`, and scored beside the teacher.

A second student, data-based (PIFLOW.md §3.1, same budget), trains on latent shards made from the real 8x8
digits (train split) by the `piflow shards latents` job (Ray actor pool; the digits family has no VAE, the
latents are the images): `piflow demo --students data-based` (`make demo-data`), after `make demo`, trains it and
shows both students side by side. `make demo` alone trains the data-free one, so that it stays within 10 minutes
on a quiet 2-core machine (issue 24, docs/demo.md).
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


def build_latent_shards(cfg: Config, out: Path) -> str:
    """The real digits (train split) as image shards, then `piflow shards latents` over a Ray actor pool."""
    from cluster.jobs.cli import latent_shards_job
    from data_pipeline.latents.shards import digits_image_shards

    images = str(out / "images")
    if not (out / "images").exists():
        digits_image_shards(images, split="train", per_shard=300)
    latents = str(out / "latents")
    latent_shards_job(cfg, images, latents, flip="none", seed=cfg.run.seed, workers=cfg.data.workers)
    return latents


def data_based_config(cfg: Config, out: Path) -> Config:
    """The data-free config with `distill.data_free: false` on the latent shards, its own run dir, same budget."""
    import dataclasses

    return dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, output=cfg.run.output.rstrip("/") + "_data"),
        distill=dataclasses.replace(cfg.distill, data_free=False),
        data=dataclasses.replace(cfg.data, shards=str(out / "latents")))


def exports_to_evaluate(out: Path, students: tuple[str, ...]) -> dict[str, Path]:
    """The exported students the table shows: those trained now, and the data-free one (the demo's main student)
    when an earlier `make demo` exported it under `out`. A data-based export is shown only when trained in this
    run, so `make demo` never reports a data-based student left behind by an older run."""
    dirs = {"data-free": out / "export", "data-based": out / "export_data"}
    return {who: d for who, d in dirs.items()
            if (who in students or who == "data-free") and (d / "model_index.json").exists()}


def run_demo(config: str | None = None, overrides: list[str] | tuple[str, ...] = (), samples_per_digit: int = 100,
             students: tuple[str, ...] = ("data-free",)) -> dict:
    """`students`: which students to train now (`make demo`: data-free; `make demo-data`: data-based, shown
    beside the data-free student an earlier `make demo` exported in the same place)."""
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

    from trainer.teachers.build import ensure_teacher

    teacher_dir = phases.run("teacher (committed, or trained once)", ensure_teacher, cfg)
    print(f"teacher: {teacher_dir}")

    from cluster.launch import launch_training
    from trainer.export.pipeline import export_student

    export_dir, data_export_dir = out / "export", out / "export_data"
    if "data-free" in students:
        phases.run("prompt shards", build_prompt_shards, cfg, 64)
        phases.run("distillation, data-free (Ray + 2 ZeRO-3 ranks + TeacherServer + DataWorkers)",
                   launch_training, cfg)
        phases.run("export (EMA, diffusers format)", export_student, cfg.run.output, export_dir)
        if storage.is_s3(cfg.run.output):
            phases.run("export upload", storage.upload_dir, str(export_dir), storage.join(cfg.run.output, "export"))
    if "data-based" in students:
        phases.run("latent shards (real digits, `piflow shards latents` job)", build_latent_shards, cfg, out)
        data_cfg = data_based_config(cfg, out)
        phases.run("distillation, data-based (same stack, latent shards)", launch_training, data_cfg)
        phases.run("export data-based (EMA, diffusers format)", export_student, data_cfg.run.output, data_export_dir)
        if storage.is_s3(data_cfg.run.output):
            phases.run("export upload", storage.upload_dir, str(data_export_dir),
                       storage.join(data_cfg.run.output, "export"))
    exports = exports_to_evaluate(out, students)
    if not exports:
        raise FileNotFoundError(f"{out}: no exported student (run `piflow demo` once)")
    if "data-free" not in students and "data-free" in exports:
        print(f"the data-free student: reused from {exports['data-free']} (exported by an earlier `make demo`)")
    elif "data-free" not in exports:
        print(f"note: no data-free student exported under {out} (`make demo` trains it): its rows are left out")

    import torch

    from trainer.evaluation.digits import evaluate_demo

    # One intra-op thread: with torch's default (2 on 2 cores) the evaluation spent 4.6x the CPU seconds and
    # 4.6-5x the wall time of one thread on the loaded 2-core machine (578 s vs 110-125 s, docs/demo.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = phases.run("evaluation", evaluate_demo, cfg, exports.get("data-free"), out, samples_per_digit,
                            data_export_dir=exports.get("data-based"))
    finally:
        torch.set_num_threads(threads)
    report["phases_s"] = phases.seconds
    report["total_s"] = phases.total
    (out / "demo_results.json").write_text(json.dumps(report, indent=1))
    print("\n" + report["table"])
    print(f"\nbars: {json.dumps(report['bars'])}")
    print(f"\ntotal {phases.total / 60:.1f} min. Outputs:")
    for name, path in report["outputs"].items():
        print(f"  {name:<22} {path}")
    return report
