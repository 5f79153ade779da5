"""Per-rank programs of the reshard / world-size-equivalence / non-finite tests: the real rank program
(`trainer.rank_program.run_rank`) on a tiny FLUX student, data-free synthetic batches (module-level so that
`spawn` can import them)."""
from __future__ import annotations

import os
import signal
import time

import torch

COND_SHAPES = {"prompt_embeds": [5, 32], "pooled_prompt_embeds": [32]}


class FaultyTeacher:
    """Test double for a failing teacher replica: the real teacher, with one injected fault at one iteration.

    `calls_per_iter` teacher calls make one iteration (r = 0: one call per segment, nfe). At iteration `at`
    (0-based) on rank `rank`: kind "nan" returns NaN velocities for the first sample of each call; kind
    "kill" waits until the checkpoint `wait_for` (a MANIFEST.json path) exists, then SIGKILLs its own process."""

    def __init__(self, teacher, calls_per_iter: int, at: int, kind: str = "nan", wait_for: str = ""):
        self.teacher, self.calls_per_iter, self.at, self.kind, self.wait_for = teacher, calls_per_iter, at, kind, wait_for
        self.calls = 0

    def __call__(self, x, sigma, cond):
        it = self.calls // self.calls_per_iter
        self.calls += 1
        u = self.teacher(x, sigma, cond)
        if it == self.at and self.kind == "nan":
            u = u.clone()
            u[0] = float("nan")
        if it == self.at and self.kind == "kill":
            deadline = time.monotonic() + 120
            while not os.path.exists(self.wait_for) and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return u


def rank_run(cfg_dict: dict, fault: dict | None = None) -> dict:
    """`run_rank` with the teacher in separate placement stood in by a local replica (optionally faulty on
    one rank), or in shared placement (the LoRA base). Returns the rank summary."""
    from models.families import get_family
    from trainer.config import config_from_dict
    from trainer.distributed import rank_info
    from trainer.rank_program import run_rank

    cfg = config_from_dict(cfg_dict)
    teacher = None
    if cfg.teacher.placement == "separate":
        teacher = get_family(cfg.model.family).build_teacher(cfg)
        if fault is not None and fault.get("rank", rank_info().rank) == rank_info().rank:
            if cfg.distill.teacher_ratio_decay_iters:
                raise ValueError("FaultyTeacher counts one call per segment: r = 0 runs only")
            per_iter = cfg.distill.nfe  # all n_int queries of a segment in one call
            teacher = FaultyTeacher(teacher, per_iter, fault["at"], fault.get("kind", "nan"), fault.get("wait_for", ""))
    torch.manual_seed(0)
    return run_rank(cfg, teacher, cond_shapes=COND_SHAPES)


def rank_runs(jobs: list) -> list:
    """Several `rank_run`s one after the other in the same ranks (process start and imports dominate the
    cost of these tiny runs). A job is (cfg_dict, fault) or (cfg_dict, fault, (src_output, step)): the
    latter first copies the checkpoint `step` of `src_output` into the job's run.output (rank 0; a barrier
    when distributed), so the job resumes from it."""
    import shutil
    from pathlib import Path

    from trainer.checkpoint.store import step_dirname
    from trainer.distributed import rank_info

    out = []
    for job in jobs:
        cfg_dict, fault = job[0], job[1]
        if len(job) > 2:
            src, step = job[2]
            if rank_info().rank == 0:
                name = step_dirname(step)
                shutil.copytree(Path(src) / "checkpoints" / name,
                                Path(cfg_dict["run"]["output"]) / "checkpoints" / name)
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()
        out.append(rank_run(cfg_dict, fault))
    return out
