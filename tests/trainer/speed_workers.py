"""One training step of a tiny FLUX / Qwen-Image student through the real rank program (`build_rank`, the
loop, the engine) with hooks the speed tests read: the student's forward batch sizes, the teacher's calls and
forwards, the gradients just before the optimiser step, the weights after it. Module level so that `spawn`
can import it (the DeepSpeed cases run in `tests/trainer/ds_spawn.py` ranks)."""
from __future__ import annotations

from typing import Any

import torch

LORA = {"flux": ["to_q", "to_k", "to_v", "proj_mlp", "ff.net.0.proj", "ff.net.2", "ff_context.net.2",
                 "timestep_embedder.linear_1"],
        "qwen_image": ["to_q", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.2", "timestep_embedder.linear_1"]}


def tiny_cfg(family: str = "flux", *, batch: int = 8, micro: int = 0, engine: str = "torch", world: int = 1,
             **sections: dict) -> dict:
    """A tiny shared-placement LoRA recipe as a dict (no YAML): 4x8x8 latents, 2 NFE, n_int 2."""
    guidance = {"mode": "embedded", "scale": 3.5} if family == "flux" else {"mode": "cfg", "scale": 4.0}
    cfg = {
        "run": {"output": "unused", "seed": 3},
        "model": {"family": family, "tiny": True, "latent_channels": 4, "latent_size": 8, "max_sequence_length": 8},
        "policy": {"num_components": 4, "logstd_inner_dim": 16, "dropout": 0.1},
        "lora": {"enabled": True, "rank": 4, "alpha": 4.0, "dropout": 0.0, "target_modules": LORA[family]},
        "distill": {"nfe": 2, "num_intermediate": 2, "total_substeps": 16, "window_substeps": 3.0},
        "teacher": {"placement": "shared", "guidance": guidance},
        "train": {"engine": engine, "batch_size": batch, "micro_batch_size": micro, "precision": "fp32",
                  "iters": 1},
        "cluster": {"student": {"workers": world}},
        "optim": {"lr": 1e-2, "warmup_iters": 0, "grad_clip": 0.0},
        "ema": {"start": 0},
    }
    for key, value in sections.items():
        for sub, v in value.items():
            if isinstance(v, dict):
                cfg.setdefault(key, {}).setdefault(sub, {}).update(v)
            else:
                cfg.setdefault(key, {})[sub] = v
    return cfg


class Submitting:
    """A local teacher with the remote client's `submit -> future` interface (the overlapped iteration's path)."""

    def __init__(self, teacher):
        self.teacher = teacher

    def submit(self, x, sigma, cond):
        from models.piid import repeat_cond
        from trainer.overlap import Done

        rows = next(iter(cond.values())).shape[0] if cond else x.shape[0]
        return Done(self.teacher(x, sigma, repeat_cond(cond, x.shape[0] // rows)))

    def __call__(self, x, sigma, cond):
        return self.teacher(x, sigma, cond)


def _data_batches(cfg, info, cond_shapes):
    """Data-based batches: the synthetic data-free ones plus DataSegments from a seeded 'data' latent."""
    from models.piid import DataSegments
    from models.timesteps import sample_segment_of
    from trainer.rank_program import synthetic_batches

    for step, (noise, cond) in enumerate(synthetic_batches(cfg, info, cond_shapes)):
        g = torch.Generator().manual_seed(100 + step)
        x0 = torch.randn(noise.shape, generator=g)
        segs = [sample_segment_of(cfg.run.seed, step * noise.shape[0] + i, cfg.distill.nfe,
                                  cfg.distill.final_step_scale) for i in range(noise.shape[0])]
        tau_src, segment = (torch.tensor(v, dtype=torch.float64) for v in zip(*segs))
        yield noise, cond, DataSegments(x0, tau_src, segment)


def one_step(cfg_dict: dict, teacher_kind: str = "shared", record_dtypes: bool = False) -> dict[str, Any]:
    """One loop iteration; returns the loop's record, the student forward batch sizes, the full gradients
    before the step and the trained weights after it (gathered under ZeRO-3; float32 numpy arrays), and
    optionally the dtypes of every matmul input of the step (`record_dtypes`)."""
    from cluster.student_group import cond_shapes_without_prompts
    from models.families import get_family
    from trainer.config import config_from_dict
    from trainer.loop import train_loop
    from trainer.rank_program import OnDevice, build_rank, iteration_for, synthetic_batches
    from models.sample_rng import SampleRNG
    from trainer.distributed import global_positions

    torch.set_num_threads(1)
    cfg = config_from_dict(cfg_dict)
    remote = None
    if cfg.teacher.placement == "separate" and teacher_kind == "server":  # the TeacherServer, Ray hop left out
        from cluster.teacher_server import TeacherServer
        from tests.trainer.bf16_workers import InProcessTeacher

        remote = InProcessTeacher(TeacherServer(cfg.to_dict()))
        torch.set_grad_enabled(True)  # the actor turns autograd off for its process; here it shares the rank's
    elif cfg.teacher.placement == "separate":
        remote = get_family(cfg.model.family).build_teacher(cfg)
        if teacher_kind == "submit":
            remote = Submitting(remote)
    torch.manual_seed(0)
    setup = build_rank(cfg, remote)
    info, engine = setup.info, setup.engine
    shapes = cond_shapes_without_prompts(cfg)
    batches = synthetic_batches(cfg, info, shapes) if cfg.distill.data_free else _data_batches(cfg, info, shapes)
    sizes: list[int] = []

    def make_policy(x, sigma, cond):
        sizes.append(x.shape[0])
        return setup.student.make_policy(x, sigma, cond)

    grads: dict[str, torch.Tensor] = {}
    step = engine.step
    ds = cfg.train.engine == "deepspeed"

    def step_and_keep_grads(nonfinite=()):
        if ds:
            from deepspeed.utils import safe_get_full_grad

            for n, p in engine.named:
                grads[n] = safe_get_full_grad(p).detach().float().cpu().clone()
        else:
            for n, p in engine.named:
                grads[n] = p.grad.detach().float().cpu().clone()
        return step(nonfinite)

    engine.step = step_and_keep_grads
    positions = global_positions(cfg.train.batch_size, info.rank, info.world_size, cfg.data.layout)
    records: list[dict] = []

    class Log:
        def log(self, step, values):
            records.append(values)

    def run():
        train_loop(cfg, engine, make_policy, setup.teacher, OnDevice(batches, setup.device), logger=Log(),
                   progress=False, iteration=iteration_for(cfg),
                   sample_rng=lambda it: SampleRNG(cfg.run.seed, [it * cfg.train.batch_size + p for p in positions]))

    dtypes = None
    if record_dtypes:
        from tests.trainer.matmul_dtypes import MatmulDtypes

        with MatmulDtypes() as seen:
            run()
        dtypes = seen.summary()
    else:
        run()
    weights = engine.gathered_state_dict() if ds else {n: p.detach().clone() for n, p in engine.named}
    weights = {n: weights[n].float() for n, _ in engine.named}
    # numpy, not tensors: torch's queue pickling shares storages through file descriptors that die with the rank
    return {"record": records[0], "sizes": sizes, "grads": {n: g.numpy() for n, g in grads.items()},
            "weights": {n: w.numpy() for n, w in weights.items()}, "dtypes": dtypes,
            "rank": info.rank}
