"""The program one student rank runs under `train.engine: deepspeed` (Ray Train worker, torchrun, or a test
launcher): build the student partitioned from the teacher's weights, the ZeRO-3 engine, the sharded power
EMA, then run `train_loop` with the teacher it is given. No ray here: the teacher arrives as an object
(`cluster.teacher_server.RemoteTeacher` in separate placement; None in shared placement, where the teacher is
the student's own LoRA base with the adapters off).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from trainer.config import Config, ConfigError
from trainer.distributed import RankInfo, rank_info
from trainer.ema import PowerEMA
from trainer.engine import build_engine, build_partitioned_student, safetensors_source


@dataclass
class RankSetup:
    info: RankInfo
    family: Any
    student: torch.nn.Module
    teacher: Any  # callable teacher(x, sigma, cond) -> u; `.submit` when remote
    engine: Any
    ema: PowerEMA


def teacher_weights_dir(cfg: Config) -> Optional[Path]:
    """Where the teacher transformer's safetensors live (None for `model.tiny` without `model.pretrained`)."""
    if not cfg.model.pretrained:
        return None
    root = Path(cfg.model.pretrained)
    path = root / cfg.model.subfolder if cfg.model.subfolder else root
    if not path.exists():
        raise ConfigError(f"model.pretrained: {path} does not exist (a diffusers-format dir with the teacher; "
                          "hub ids must be downloaded to a shared path first for distributed runs)")
    return path


def build_rank(cfg: Config, remote_teacher: Any = None) -> RankSetup:
    """Student, teacher, engine and EMA of this rank (collective: every rank calls it)."""
    from models.families import get_family
    from models.teacher import Teacher

    info = rank_info()
    family = get_family(cfg.model.family)
    shared = cfg.teacher.placement == "shared"
    if not shared and remote_teacher is None:
        raise ValueError("teacher.placement: separate needs a remote teacher client (TeacherServer handles)")
    teacher = Teacher(family, cfg, None) if shared else remote_teacher
    weights_dir = teacher_weights_dir(cfg)

    def build_trunk() -> torch.nn.Module:
        if weights_dir is None:
            return family.load_network(cfg)  # tiny, seeded: the same values on every rank
        config = family.transformer_class.load_config(str(weights_dir))
        return family.transformer_class.from_config(config)

    def finish(trunk: torch.nn.Module) -> torch.nn.Module:
        return family.build_student(cfg, teacher=teacher if shared else None, network=trunk)

    torch.manual_seed(cfg.run.seed)  # modules built here (LoRA A, ...) start identical on every rank
    weights = safetensors_source(weights_dir) if weights_dir is not None else {}
    student = build_partitioned_student(cfg, build_trunk, weights, family.output_modules, finish) \
        if weights_dir is not None else _build_without_file(cfg, build_trunk, family, finish)
    engine = build_engine(cfg, student)
    master = engine.local_master if cfg.train.engine == "deepspeed" else None
    ema = PowerEMA(engine.params, gamma=cfg.ema.gamma, start=cfg.ema.start, master=master)
    return RankSetup(info, family, student, teacher, engine, ema)


def _build_without_file(cfg: Config, build_trunk, family, finish) -> torch.nn.Module:
    """Tiny teachers have no weights file: every rank builds the same seeded trunk partitioned (zero.Init)
    and the output modules are gathered as in `build_partitioned_student`."""
    return build_partitioned_student(cfg, build_trunk, _NoWeights(), family.output_modules, finish)


class _NoWeights(dict):
    """An empty weights source: keep the (seeded) constructed values."""


def iteration_for(cfg: Config):
    """The loop's iteration: overlapped when the teacher is remote and `teacher.overlap` is on."""
    if cfg.teacher.placement == "separate" and cfg.teacher.overlap:
        from trainer.overlap import overlapped_iteration

        return overlapped_iteration
    return None  # the loop's sequential data_free_iteration


def run_rank(cfg: Config, batches: Iterator[tuple[torch.Tensor, Any]], remote_teacher: Any = None,
             output_dir: Optional[str] = None, progress: bool = False) -> dict[str, Any]:
    """Train `cfg.train.iters` iterations on this rank; returns this rank's summary (rank 0 logs metrics)."""
    from trainer.loop import train_loop
    from trainer.metrics import MetricsLogger

    import time

    from trainer.timing import FirstStepClock, PhaseTimes

    t_init = time.perf_counter()
    setup = build_rank(cfg, remote_teacher)
    # startup timing (issue 7): rank 0 prints each phase as it ends; every rank reports its own in the summary
    times = PhaseTimes(print_each=setup.info.is_rank0)
    times.add("student_init", time.perf_counter() - t_init)
    batches = FirstStepClock(batches, times)
    out = Path(output_dir or cfg.run.output)
    logger = MetricsLogger(cfg, out, rank=setup.info.rank)
    generator = torch.Generator().manual_seed(cfg.run.seed * 7919 + 2 + setup.info.rank)
    try:
        steps = train_loop(cfg, setup.engine, setup.student.make_policy, setup.teacher, batches, ema=setup.ema,
                           logger=logger, generator=generator, progress=progress, iteration=iteration_for(cfg))
    finally:
        logger.close()
    batches.finish()
    local = sum(p.ds_tensor.numel() for p in setup.engine.params if hasattr(p, "ds_tensor"))
    full = sum(getattr(p, "ds_numel", p.numel()) for p in setup.engine.params)
    return {"rank": setup.info.rank, "steps": steps, "local_numel": local, "full_numel": full,
            "metrics_path": str(logger.path), "startup": times.seconds}


def synthetic_batches(cfg: Config, info: RankInfo, cond_shapes: dict[str, list[int]]
                      ) -> Iterator[tuple[torch.Tensor, Any]]:
    """Data-free batches without prompt shards: per step, the global batch's noise and random conditioning
    (shapes per sample in `cond_shapes`, e.g. {"prompt_embeds": [T, D]}) from generators seeded by
    (run.seed, step), sliced for this rank by `data.layout` (the same samples whatever the world size)."""
    from models.families import get_family

    shape = get_family(cfg.model.family).latent_shape(cfg)
    n = cfg.train.batch_size
    if n % info.world_size:
        raise ValueError(f"train.batch_size {n} does not split over {info.world_size} ranks")
    per = n // info.world_size
    idx = (torch.arange(info.rank, n, info.world_size) if cfg.data.layout == "strided"
           else torch.arange(info.rank * per, (info.rank + 1) * per))
    step = 0
    while True:
        g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step)
        noise = torch.randn((n, *shape), generator=g)  # (B_global, C, H, W)
        cond = {k: torch.randn((n, *s), generator=g)[idx] for k, s in cond_shapes.items()} or None
        yield noise[idx], cond
        step += 1
