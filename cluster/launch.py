"""Start a training run: in this process (`train.engine: torch`, one worker) or distributed over Ray.

`launch_training(cfg, config_path)` is what `piflow train` calls after the config has been validated.
"""
from __future__ import annotations

from trainer.config import Config, ConfigError


def launch_training(cfg: Config, config_path: str | None = None) -> None:
    engine, workers = cfg.train.engine, cfg.cluster.student.workers
    if engine == "torch":
        if workers != 1:
            raise ConfigError(f"{config_path or '<config>'}: key 'cluster.student.workers': train.engine: torch "
                              f"runs in one process, got {workers} workers (use train.engine: deepspeed)")
        from trainer.local_run import run_local

        run = run_local(cfg)
        print(f"done: {run.steps} steps; metrics in {run.metrics_path}")
    elif engine == "deepspeed":
        from cluster.orchestrator import connect, start_teacher_group
        from cluster.student_group import cond_shapes_without_prompts, run_student_group

        from trainer.timing import PhaseTimes

        times = PhaseTimes()  # startup per phase (issue 7); the ranks print student_init / first_step
        with times.phase("ray_up"):
            connect(cfg)
        with times.phase("teacher_load"):
            group = start_teacher_group(cfg)  # None in shared placement
        try:
            summaries = run_student_group(cfg, group.servers if group else None, cond_shapes_without_prompts(cfg))
        finally:
            if group is not None:
                group.shutdown()
        times.merge_max([s.get("startup", {}) for s in summaries])
        print(f"piflow: {times.format()}")
        print(f"done: {summaries[0]['steps']} steps on {len(summaries)} ranks; metrics in {summaries[0]['metrics_path']}")
    else:  # the config's Literal makes this unreachable; kept so a new engine value cannot fall through
        raise ConfigError(f"{config_path or '<config>'}: key 'train.engine': unknown engine {engine!r}")
