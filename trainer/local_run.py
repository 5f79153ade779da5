"""A whole training run in one process (`train.engine: torch`, one worker): the toy and quick experiments.

Builds the teacher (the project's own, cached) and the student of the config's family, the engine, the power
EMA, the metrics logger, the noise batches of data-free pi-ID, resume/checkpoint hooks, and an evaluation
hook (toy: distribution metrics of EMA samples against a 256-step teacher set), then runs `train_loop`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from trainer.config import Config, ConfigError, dump_config
from trainer.ema import PowerEMA
from trainer.engine import build_engine
from trainer.loop import train_loop
from trainer.metrics import MetricsLogger
from trainer.teachers.build import build_teacher


@dataclass
class LocalRun:
    """What a finished in-process run leaves behind (the benchmark and the demo sample from it)."""

    cfg: Config
    family: Any
    teacher: Any  # callable teacher(x, sigma, cond) -> u
    student: torch.nn.Module  # live weights
    ema: PowerEMA  # `with run.ema.applied():` evaluates the EMA weights
    steps: int
    metrics_path: Path


def build_family(cfg: Config):
    """model.family -> the family object, for the families that run in process (the toy; the others need
    prompt batches and run distributed)."""
    if cfg.model.family == "toy2d":
        from models.families import get_family

        return get_family(cfg.model.family)
    raise ConfigError(f"model.family: in-process training (train.engine: torch) supports 'toy2d'; "
                      f"{cfg.model.family!r} runs with train.engine: deepspeed")


def noise_batches(cfg: Config, family, generator: torch.Generator, start_step: int = 0) -> Iterator[tuple]:
    """Batches without prompts, forever: data-free (noise (B, C, H, W), cond None); data-based (toy2d's
    mixture is the data) also DataSegments with x0 and each sample's segment drawn, like its x0, from
    generators keyed by (run.seed, global sample index), so a resume continues the same samples."""
    from models.piid import DataSegments
    from models.sample_rng import sample_key
    from models.timesteps import sample_segment_of

    shape = family.latent_shape(cfg)
    n, step = cfg.train.batch_size, start_step
    while True:
        noise = torch.randn((n, *shape), generator=generator)
        if cfg.distill.data_free:
            yield noise, None
        else:
            from models.families.toy2d import ToyMixture, to_image

            index = range(step * n, (step + 1) * n)
            x0 = torch.cat([ToyMixture.default().sample(1, torch.Generator().manual_seed(
                sample_key(cfg.run.seed, i, "toy-data"))) for i in index])
            segs = [sample_segment_of(cfg.run.seed, i, cfg.distill.nfe, cfg.distill.final_step_scale) for i in index]
            tau_src, segment = (torch.tensor(v, dtype=torch.float64) for v in zip(*segs))
            yield noise, None, DataSegments(to_image(x0), tau_src, segment)
        step += 1


def toy_eval_hook(cfg: Config, family, teacher, student, progress: bool = False) -> Callable[[int], dict]:
    """Distribution metrics of cfg.eval.num_samples student samples (eval.nfe steps, temperature per
    eval.temperature) against a 256-step teacher set drawn once."""
    from models.families.toy2d import ToyMixture, distribution_metrics, euler_sample, to_image
    from models.sampling import sample

    gen = torch.Generator().manual_seed(cfg.eval.seed + 12345)
    n = cfg.eval.num_samples
    reference = euler_sample(teacher, to_image(torch.randn(n, 2, generator=gen)), 256)
    mixture = ToyMixture.default()
    d = cfg.distill

    def hook(step: int) -> dict:
        noise = to_image(torch.randn(n, 2, generator=torch.Generator().manual_seed(cfg.eval.seed)))
        x = sample(student.make_policy, noise, cfg.eval.nfe, d.final_step_scale, d.shift, d.total_substeps,
                   temperature="auto" if cfg.eval.temperature == "auto" else 1.0)
        return distribution_metrics(x, reference, mixture)

    return hook


def run_local(cfg: Config, progress: bool = True, checkpoints: bool = True,
              eval_hook: Optional[Callable[[int], dict]] = None,
              guard: Optional[Callable[[], None]] = None) -> LocalRun:
    """The whole run in this process; run.output local or `s3://`. `guard()`: the output lease's check
    (trainer/checkpoint/lease.py), called before logs and checkpoints are written."""
    if cfg.train.engine != "torch" or cfg.cluster.student.workers != 1:
        raise ConfigError("in-process training needs train.engine: torch and cluster.student.workers: 1")
    from trainer.checkpoint import resume

    torch.manual_seed(cfg.run.seed)
    family = build_family(cfg)
    teacher = build_teacher(cfg, family, progress=progress)
    student = family.build_student(cfg, teacher)  # head noise from the global RNG, seeded above
    engine = build_engine(cfg, student)
    ema = PowerEMA(student.parameters(), gamma=cfg.ema.gamma, start=cfg.ema.start)
    generators = {"noise": torch.Generator().manual_seed(cfg.run.seed + 1),
                  "piid": torch.Generator().manual_seed(cfg.run.seed + 2)}

    from data_pipeline import storage

    out = cfg.run.output
    manager = state = None
    if checkpoints:
        info = resume.prepare_output(cfg, rank=0)
        manager = resume.make_manager(cfg, rank=0, world_size=1)
        state = resume.resume_state(cfg, manager, info, engine, ema, student, generators)
    storage.makedirs(out)
    storage.put_bytes(storage.join(out, "config.yaml"), dump_config(cfg).encode())
    if eval_hook is None and cfg.eval.every and cfg.model.family == "toy2d":
        eval_hook = toy_eval_hook(cfg, family, teacher, student)

    logger = MetricsLogger(cfg, out, run_id=(state.wandb_run_id or None) if state else None,
                           resume_step=state.step if state else 0, guard=guard)  # a fresh run drops stale steps
    if cfg.eval.every:  # validation rollouts to run.output/rollouts/step_N and wandb (trainer/evaluation/rollouts.py, issue 6)
        from trainer.evaluation.rollouts import RolloutHook, chain_hooks

        rollouts = RolloutHook(cfg, family, student, logger=logger)
        eval_hook = chain_hooks(eval_hook, rollouts)

    def checkpoint_hook(step: int, loss: Optional[float] = None) -> float:
        if guard is not None:
            guard()
        logger.flush()  # the log on storage covers every step up to the checkpoint, before it commits
        return resume.save_state(cfg, manager, step, engine, ema, student, generators=generators,
                                 wandb_run_id=logger.wandb_run_id or "", loss=loss)

    try:
        steps = train_loop(
            cfg, engine, student.make_policy, teacher,
            noise_batches(cfg, family, generators["noise"], start_step=state.step if state else 0),
            ema=ema, logger=logger, eval_hook=eval_hook, checkpoint_hook=checkpoint_hook if checkpoints else None,
            start_step=state.step if state else 0, generator=generators["piid"], progress=progress,
        )
    finally:
        if cfg.eval.every:
            rollouts.close()  # queued rollout uploads
        logger.close()
        if manager is not None:
            manager.close()
    return LocalRun(cfg, family, teacher, student, ema, steps, logger.path)
