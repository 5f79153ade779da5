"""Per-rank programs of the engine tests (module-level so that `spawn` can import them)."""
from __future__ import annotations

import torch

from tests.trainer.tiny_flux import C, H, W, TinyFlux, make_cond
from trainer.checkpoint.store import RankStates, read_rank_state, write_rank_state
from trainer.config import config_from_dict
from trainer.distributed import global_noise, local_slice, rank_info
from trainer.ema import PowerEMA, power_ema_beta
from trainer.engine import build_engine, load_partitioned, partitioned_construction


def make_cfg(world: int, engine: str = "deepspeed", **train) -> dict:
    return {
        "train": {"engine": engine, "batch_size": 4, "precision": "fp32", **train},
        "cluster": {"student": {"workers": world}},
        "optim": {"lr": 1e-3, "warmup_iters": 3, "warmup_start_factor": 0.1, "grad_clip": 0.02,
                  "grad_clip_start": 5},
        "ema": {"gamma": 7.0, "start": 2},
    }


def _batch(step: int, global_batch: int, info) -> tuple:
    """This rank's slice of the step's global batch: x (B,C,H,W), sigma (B,), cond."""
    x = global_noise((C, H, W), global_batch, seed=0, step=step, info=info)
    g = torch.Generator().manual_seed(1000 + step)
    sigma = torch.rand(global_batch, generator=g)[local_slice(global_batch, info.rank, info.world_size)]
    cond = make_cond(global_batch, seed=2000 + step)
    cond = {k: v[local_slice(global_batch, info.rank, info.world_size)] for k, v in cond.items()}
    return x, sigma, cond


def student_and_teacher(cfg, teacher_path: str) -> tuple[TinyFlux, TinyFlux]:
    """The student built partitioned (zero.Init under deepspeed) and the frozen teacher, both from the file."""
    from safetensors import safe_open

    torch.manual_seed(123)  # construction RNG: the teacher file overwrites every weight anyway
    with partitioned_construction(cfg):
        student = TinyFlux()
    if cfg.model.gradient_checkpointing:  # as models.student does for a family student; the engine verifies it
        student.transformer.enable_gradient_checkpointing()
    with safe_open(teacher_path, framework="pt") as f:
        load_partitioned(student, f)
    teacher = TinyFlux().requires_grad_(False).eval()
    with safe_open(teacher_path, framework="pt") as f:
        load_partitioned(teacher, f)
    return student, teacher


def train_trajectory(cfg_dict: dict, teacher_path: str, steps: int, grad_ckpt: bool = False,
                     ckpt_dir: str = "", ckpt_step: int = -1) -> dict:
    """Student initialised from the teacher file (partitioned), L2 regression to `teacher + 0.1 x`.

    With `ckpt_dir`, saves a checkpoint (ZeRO shards + EMA shard) after step `ckpt_step`, and after the last
    step reloads it and replays the remaining steps (`replay_loss`, `replay_ema_equal`)."""
    cfg = config_from_dict({**cfg_dict, "model": {"gradient_checkpointing": grad_ckpt}})
    student, teacher = student_and_teacher(cfg, teacher_path)
    engine = build_engine(cfg, student)
    info = rank_info()
    ds = cfg.train.engine == "deepspeed"
    ema = PowerEMA(engine.params, gamma=cfg.ema.gamma, start=cfg.ema.start,
                   master=engine.local_master if ds else None, refresh=engine.refresh_gathered if ds else None)
    out = {"loss": [], "grad_norm": [], "lr": [], "local_numel": 0, "full_numel": 0}
    for p in engine.params:
        out["local_numel"] += p.ds_tensor.numel() if ds else p.numel()
        out["full_numel"] += p.ds_numel if ds else p.numel()
    def train_step(step: int) -> tuple[torch.Tensor, dict]:
        x, sigma, cond = _batch(step, cfg.train.batch_size, info)
        with torch.no_grad():
            target = teacher(x, sigma, cond) + 0.1 * x  # (B,C,H,W)
        u = engine.module(x, sigma, cond)
        loss = ((u - target) ** 2).mean()
        engine.backward(loss)
        stats = engine.step()
        ema.update(step)
        return loss, stats

    ref_ema = None
    for step in range(steps):
        loss, stats = train_step(step)
        if step == ckpt_step:
            write_rank_state(engine, ema, f"{ckpt_dir}/rank_{info.rank}")
        full = engine.gathered_state_dict() if ds else {k: v.detach().clone() for k, v in student.state_dict().items()}
        names = [n for n, p in (engine._ds.module if ds else student).named_parameters() if p.requires_grad]
        beta = power_ema_beta(step, cfg.ema.gamma, cfg.ema.start)
        cur = {n: full[n].double() for n in names}
        ref_ema = cur if ref_ema is None else {n: beta * ref_ema[n] + (1 - beta) * cur[n] for n in names}
        out.setdefault("local_loss", []).append(float(loss.detach()))
        if ds:
            import torch.distributed as dist

            dist.all_reduce(loss := loss.detach().clone())
            loss = loss / info.world_size
        out["loss"].append(float(loss.detach()))
        out["grad_norm"].append(stats["grad_norm"])
        out["lr"].append(stats["lr"])
    with ema.applied():
        ema_full = engine.gathered_state_dict() if ds else {k: v.detach().clone() for k, v in student.state_dict().items()}
    out["ema_max_err"] = max(float((ema_full[n].double() - ref_ema[n]).abs().max()) for n in ref_ema)
    after = engine.gathered_state_dict() if ds else student.state_dict()
    out["restored_after_ema"] = all(torch.equal(after[n], full[n]) for n in ref_ema)
    out["ema_shard_numel"] = sum(s.numel() for s in ema.shadow)
    if ckpt_dir:
        final_ema = [s.clone() for s in ema.shadow]
        read_rank_state(engine, ema, RankStates({info.rank: f"{ckpt_dir}/rank_{info.rank}"}, ckpt_dir))
        out["replay_loss"] = []
        for step in range(ckpt_step + 1, steps):
            loss, _ = train_step(step)
            out["replay_loss"].append(float(loss.detach()))
        out["replay_ema_equal"] = all(torch.equal(a, b) for a, b in zip(final_ema, ema.shadow))
    return out


# ------------------------------------------------------------------------------- real pi-ID, FLUX family
def flux_cfg(world: int, pretrained: str, placement: str = "shared", **extra) -> dict:
    """Tiny FLUX student (LoRA + GM head) distilled with data-free pi-ID; teacher weights from `pretrained`."""
    cfg = {
        "model": {"family": "flux", "tiny": not pretrained, "pretrained": pretrained, "latent_channels": 4,
                  "latent_size": 8},
        "policy": {"num_components": 2, "logstd_inner_dim": 16},
        "lora": {"enabled": True, "rank": 4, "alpha": 4.0, "dropout": 0.0,
                 "target_modules": ["to_q", "to_k", "to_v", "proj_mlp", "ff.net.2", "ff_context.net.2"]},
        "distill": {"nfe": 2, "num_intermediate": 2, "total_substeps": 16},
        "teacher": {"placement": placement, "guidance": {"mode": "embedded", "scale": 3.5}},
        "train": {"engine": "deepspeed", "batch_size": 4, "precision": "fp32", "iters": 2},
        "cluster": {"student": {"workers": world}},
        "optim": {"lr": 1e-3, "warmup_iters": 2, "warmup_start_factor": 0.1, "grad_clip": 1.0, "grad_clip_start": 1},
        "ema": {"start": 1},
    }
    for key, value in extra.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


def global_piid_batch(step: int, global_batch: int) -> tuple[torch.Tensor, dict]:
    """The whole global batch of a step: noise (B,4,8,8) and conditioning (T = 5 text tokens of 32)."""
    g = torch.Generator().manual_seed(7000 + step)
    noise = torch.randn(global_batch, 4, 8, 8, generator=g)
    cond = {"prompt_embeds": torch.randn(global_batch, 5, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(global_batch, 32, generator=g)}
    return noise, cond


def piid_trajectory(cfg_dict: dict, steps: int, accum: int) -> dict:
    """`steps` data-free pi-ID iterations; the global batch is cut into world x accum micro-shards, each with
    its own pi-ID random stream (seeded by step and shard index), so any (world, accum) with the same
    product sees the same samples and the same random times. Returns the rank-averaged losses."""
    import torch.distributed as dist

    from models.piid import data_free_iteration
    from trainer.loop import piid_params
    from trainer.rank_program import build_rank

    cfg = config_from_dict(cfg_dict)
    local_teacher = None
    if cfg.teacher.placement == "separate":  # a full local replica stands in for the TeacherServer here
        from models.families import get_family

        local_teacher = get_family(cfg.model.family).build_teacher(cfg)
    torch.manual_seed(0)  # LoRA A matrices: the same on every rank and world size
    setup = build_rank(cfg, local_teacher)
    info, engine, student = setup.info, setup.engine, setup.student
    params = piid_params(cfg)
    shards = info.world_size * accum
    micro = cfg.train.batch_size // shards
    out = {"loss": [], "grad_norm": [], "local_numel": 0, "full_numel": 0}
    ds = cfg.train.engine == "deepspeed"
    for p in engine.params:
        out["local_numel"] += p.ds_tensor.numel() if ds else p.numel()
        out["full_numel"] += p.ds_numel if ds else p.numel()
    if ds:  # where the frozen base lives: ZeRO-3 partitions, or whole buffers (replicate)
        module = engine._ds.module
        frozen = [p for p in module.parameters() if not p.requires_grad]
        buffers = [module.get_buffer(n) for n in engine.frozen_buffers]
        out["layout"] = [engine.layout.frozen, engine.layout.trainable]
        out["frozen_zero_params"] = bool(frozen) and all(hasattr(p, "ds_tensor") for p in frozen)
        out["frozen_local_numel"] = sum(p.ds_tensor.numel() for p in frozen) + sum(b.numel() for b in buffers)
        out["frozen_full_numel"] = sum(p.ds_numel for p in frozen) + sum(b.numel() for b in buffers)
    for step in range(steps):
        noise, cond = global_piid_batch(step, cfg.train.batch_size)
        total = torch.zeros(())
        for m in range(accum):
            shard = info.rank * accum + m
            sl = slice(shard * micro, (shard + 1) * micro)
            c = {k: v[sl] for k, v in cond.items()}
            gen = torch.Generator().manual_seed(10_000 * step + shard)
            for weighted_loss, _ in data_free_iteration(lambda x, s: student.make_policy(x, s, c), setup.teacher,
                                                        noise[sl], c, params, generator=gen):
                engine.backward(weighted_loss / accum)
                total += weighted_loss.detach() / accum
        stats = engine.step()
        setup.ema.update(step)
        if ds:
            dist.all_reduce(total)
        out["loss"].append(float(total) / info.world_size)
        out["grad_norm"].append(stats["grad_norm"])
    return out
