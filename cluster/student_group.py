"""The student group: `cluster.student.workers` Ray Train workers (TorchTrainer: Ray builds the process
group, gloo on CPU / nccl on GPU, and DeepSpeed ZeRO-3 runs inside), restarted by a `FailureConfig`.

Each worker runs `trainer.rank_program.run_rank` with a `RemoteTeacher` over the TeacherServer handles
(separate placement) or none (shared), and writes its summary to `<output>/rank_summaries/rank_R.json`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from trainer.config import Config


def _backend(cfg: Config, use_gpu: bool) -> str:
    if cfg.cluster.backend != "auto":
        return cfg.cluster.backend
    return "nccl" if use_gpu else "gloo"


def _worker(config: dict) -> None:
    """One student rank (runs inside a Ray Train worker process)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train

    from cluster.teacher_server import RemoteTeacher
    from trainer.config import config_from_dict
    from trainer.distributed import rank_info
    from trainer.rank_program import run_rank, synthetic_batches

    cfg = config_from_dict(config["cfg"], source="<student group>")
    if config.get("num_threads"):
        torch.set_num_threads(config["num_threads"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    teacher = RemoteTeacher(config["servers"], rank) if config["servers"] else None
    if cfg.data.shards:
        raise NotImplementedError("prompt shards on the student group: wire data_pipeline RankBatches here")
    batches = synthetic_batches(cfg, rank_info(), config["cond_shapes"])
    summary = run_rank(cfg, batches, teacher, output_dir=config["output"])
    if teacher is not None:
        summary["teacher_stats"] = teacher.stats()
    summary["node_id"] = ray.get_runtime_context().get_node_id()  # issue 7: where the rank ran
    path = Path(config["output"]) / "rank_summaries" / f"rank_{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))
    ray.train.report({"steps": summary["steps"]})


def cond_shapes_without_prompts(cfg: Config) -> dict[str, list[int]]:
    """Per-sample conditioning shapes of data-free runs without prompt shards (random embeddings), from the
    teacher transformer's config. Runs with `data.shards` get real prompt embeddings instead."""
    from models.families import get_family

    family = get_family(cfg.model.family)
    if cfg.model.family != "flux":
        raise NotImplementedError(f"model.family={cfg.model.family!r} without data.shards: only flux has a "
                                  "prompt-free mode here; set data.shards")
    if cfg.model.pretrained:
        net_cfg = family.transformer_class.load_config(cfg.model.pretrained, subfolder=cfg.model.subfolder or None)
    else:
        net_cfg = family.tiny_config(cfg)
    return {"prompt_embeds": [min(cfg.model.max_sequence_length, 16), net_cfg["joint_attention_dim"]],
            "pooled_prompt_embeds": [net_cfg["pooled_projection_dim"]]}


def run_student_group(cfg: Config, servers: Optional[list], cond_shapes: dict[str, list[int]],
                      output: Optional[str] = None, num_threads: int = 0) -> list[dict[str, Any]]:
    """Train under Ray Train; returns the per-rank summaries (index = rank)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.cluster.student
    use_gpu = s.gpus_per_worker > 0
    out = Path(output or cfg.run.output).resolve()
    if "://" in str(output or cfg.run.output):
        raise NotImplementedError("run.output on object storage: the student group writes metrics locally")
    storage = cfg.cluster.storage_path or str(out / "ray_train")
    resources = {"CPU": s.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = s.gpus_per_worker
    if s.custom_resource:  # issue 7: pins ranks to the nodes that advertise it
        resources[s.custom_resource] = 1.0
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg.to_dict(), "servers": servers or [], "cond_shapes": cond_shapes,
                           "output": str(out), "num_threads": num_threads},
        torch_config=TorchConfig(backend=_backend(cfg, use_gpu)),
        scaling_config=ray.train.ScalingConfig(num_workers=s.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources, placement_strategy="PACK"),
        run_config=ray.train.RunConfig(name=cfg.run.name, storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=s.max_failures)),
    )
    trainer.fit()
    return [json.loads((out / "rank_summaries" / f"rank_{r}.json").read_text()) for r in range(s.workers)]
