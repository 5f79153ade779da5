"""Per-rank program of the bf16 tests (module level so `spawn` can import it): `run_rank` of a tiny recipe
through ZeRO-3 with the teacher in the recipe's placement (shared: the student's LoRA base; separate: a
TeacherServer object in the rank's process, the Ray hop left out)."""
from __future__ import annotations

import torch


class InProcessTeacher:
    """RemoteTeacher's transport without Ray (a test double of the hop only): conditioning and inputs cross as
    CPU tensors, the velocity comes back on x's device; the server's own put_cond/_forward run as they are."""

    def __init__(self, server):
        self.server, self._last, self._n = server, None, 0

    def __call__(self, x, sigma, cond):
        from cluster.teacher_server import _repeat

        if cond is not self._last:
            self._n, self._last = self._n + 1, cond
            self.server.put_cond(str(self._n), None if cond is None else {k: v.cpu() for k, v in cond.items()})
        rows = x.shape[0] if cond is None else next(iter(cond.values())).shape[0]
        c = _repeat(self.server._conds[str(self._n)], x.shape[0] // rows)
        (u,) = self.server._forward([(x.detach().float().cpu(), sigma.detach().float().cpu(), c, None, 0.0)])
        return u.to(x.device)


def run_recipe(cfg_dict: dict) -> dict:
    from cluster.student_group import cond_shapes_without_prompts
    from cluster.teacher_server import TeacherServer
    from trainer.config import config_from_dict
    from trainer.rank_program import run_rank

    cfg = config_from_dict(cfg_dict)
    teacher = None
    if cfg.teacher.placement == "separate":
        teacher = InProcessTeacher(TeacherServer(cfg.to_dict()))
        torch.set_grad_enabled(True)  # the actor turns autograd off for its process; here it shares the rank's
    return run_rank(cfg, teacher, cond_shapes=cond_shapes_without_prompts(cfg))
