"""Per-rank program of the 2-rank DeepSpeed checkpoint test (module-level so that `spawn` can import it)."""
from __future__ import annotations

import torch


def ds_checkpoint_run(output: str, teacher_path: str) -> dict:
    """ZeRO-3 tiny FLUX: 4 steps with checkpoints after steps 2 and 4 through CheckpointManager (shards staged
    locally per rank, uploaded, manifest by rank 0), then resume from step 2 and replay steps 3-4."""
    import torch.distributed as dist

    from tests.trainer.engine_workers import _batch, make_cfg, student_and_teacher
    from trainer.checkpoint.store import CheckpointInfo, CheckpointManager, read_manifest, step_dirname
    from trainer.config import config_from_dict
    from trainer.distributed import rank_info
    from trainer.ema import PowerEMA
    from trainer.engine import build_engine
    from trainer.checkpoint.resume import resume_state, save_state

    cfg = config_from_dict({**make_cfg(2), "run": {"output": output}})
    student, teacher = student_and_teacher(cfg, teacher_path)
    engine = build_engine(cfg, student)
    ema = PowerEMA(engine.params, gamma=cfg.ema.gamma, start=cfg.ema.start, master=engine.local_master,
                   refresh=engine.refresh_gathered)
    info = rank_info()
    gens = {"extra": torch.Generator().manual_seed(50 + info.rank)}

    def train_step(step: int) -> float:
        x, sigma, cond = _batch(step, cfg.train.batch_size, info)
        with torch.no_grad():
            target = teacher(x, sigma, cond) + 0.1 * x + 0.01 * torch.randn(x.shape, generator=gens["extra"])
        loss = ((engine.module(x, sigma, cond) - target) ** 2).mean()
        engine.backward(loss)
        engine.step()
        ema.update(step)
        return float(loss.detach())

    manager = CheckpointManager(output, rank=info.rank, world_size=info.world_size, keep_last=5, barrier=dist.barrier)
    losses = []
    for step in range(4):
        losses.append(train_step(step))
        if step in (1, 3):
            save_state(cfg, manager, step + 1, engine, ema, student, data_state={"cursor": step + 1},
                       generators=gens)
    manager.close()
    with ema.applied():
        gathered = engine.gathered_state_dict()  # collective
    trained = {n for n, p in student.named_parameters() if p.requires_grad}

    url = f"{output}/checkpoints/{step_dirname(2)}"
    unsafe, real_load = [], torch.load

    def guarded_load(*args, **kwargs):  # records any load that could unpickle code (none may happen)
        if kwargs.get("weights_only") is not True:
            unsafe.append(repr(args[:1]))
        return real_load(*args, **kwargs)

    torch.load = guarded_load
    state = resume_state(cfg, CheckpointManager(output, rank=info.rank, world_size=info.world_size), 
                         CheckpointInfo(2, url, read_manifest(url)), engine, ema, student, gens)
    torch.load = real_load
    replay = [train_step(step) for step in range(state.step, 4)]
    if info.rank == 0:  # tensors go through a file: the result queue cannot carry shared-memory tensors
        torch.save({n: gathered[n].clone() for n in trained}, f"{output}.gathered_ema.pt")
    return {"losses": losses, "replay": replay, "cursor": state.data_state["cursor"], "unsafe_loads": unsafe}
