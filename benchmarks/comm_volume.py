"""Communication volume per iteration of the FLUX recipe under each weight layout (issue 23; CPU, gloo).

The recipe `configs/flux_dev_gm_k8_4nfe.yaml` runs as rehearsed: the rehearsal shrink set (depth and width: the
family's tiny FLUX saved as a diffusers dir and loaded by the real loader; latent 8x8, 8 text tokens, one prompt
per rank, LoRA rank 4 at that width, a few iterations, no evaluation, wandb off) and everything else as written:
its LoRA targets, bf16, shared placement, gradient checkpointing, 4 NFE x 4 teacher queries, DeepSpeed ZeRO-3.
Every `torch.distributed` collective is counted (hardware-independent): bytes all-gathered (the gathered tensor)
and reduce-scattered (the tensor reduced) per iteration and rank, split into frozen and trainable parameters by
the parameters DeepSpeed gathers in that call, and into collectives whose group spans more than one node. The
4-rank runs are 2 loopback "nodes" of 2 ranks (NODE_RANK / LOCAL_WORLD_SIZE as Ray Train sets them).

    .venv/bin/python benchmarks/comm_volume.py            # 2 and 4 ranks, every layout
    .venv/bin/python benchmarks/comm_volume.py --tiny --out /tmp/cv.json   # the suite's quick run

Prints a table and writes benchmarks/results/comm_volume.json (the bars of issue 23 included), and the planner's
prediction of the same bytes (`trainer.planner.time_plan.comm_bytes`) beside each measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "configs" / "flux_dev_gm_k8_4nfe.yaml"
# (frozen_weights, trainable_comm, prefetch_blocks). shard + per_pass is the layout before issue 23. Prefetch 0:
# DeepSpeed gathers on every use, as the planner counts (with prefetch it keeps a parameter gathered when its next
# use lies inside the prefetch window, which at reduced size spans a large part of the model: fewer bytes than at
# full size). per_step needs prefetch (trainer/config.py).
LAYOUTS = [("shard", "per_pass", 0.0), ("shard", "per_pass", 1.0), ("shard", "per_step", 1.0),
           ("shard_in_node", "per_pass", 0.0), ("shard_in_node", "per_step", 1.0), ("replicate", "per_step", 1.0)]
QUICK_LAYOUTS = [("shard", "per_step", 1.0), ("shard_in_node", "per_pass", 0.0), ("replicate", "per_step", 1.0)]
# The loss bar (replicate trains like shard) in float32: in bf16 the two layouts' autograd graphs differ (ZeRO-3's
# module hooks stay on blocks holding partitioned frozen weights and are gone where everything is gathered), so
# activation gradients are summed in another order and rounded to bf16 differently (~1e-3 relative by step 3).
LOSS_LAYOUTS = [("shard", "per_step", 1.0, "fp32"), ("replicate", "per_step", 1.0, "fp32")]
KINDS = ("gather_frozen", "gather_trainable", "gather_other", "reduce_scatter", "broadcast", "other")


def rehearsal_overrides(pretrained: str, output: str, world: int, frozen: str, trainable: str, iters: int,
                        prefetch: float = 1.0) -> list[str]:
    """The shrink set applied to the recipe (everything not named here stays as the recipe says)."""
    return [f"model.pretrained={pretrained}", "model.tiny=false", "model.latent_size=8", "model.max_sequence_length=8",
            "policy.logstd_inner_dim=16", "lora.rank=4", "lora.alpha=4.0", f"train.batch_size={world}",
            "train.micro_batch_size=0", f"train.iters={iters}", f"train.ckpt_every={iters + 100}",
            f"cluster.student.workers={world}", "cluster.student.gpus_per_worker=0", "cluster.nodes=0",
            "cluster.gpus_per_node=0", "cluster.gpu_memory_gb=0", f"train.frozen_weights={frozen}",
            f"train.trainable_comm={trainable}", f"train.prefetch_blocks={prefetch}", f"run.output={output}", "run.force=true", "eval.every=0",
            "wandb.mode=disabled", "data.shards=", "distill.total_substeps=16", "optim.warmup_iters=0",
            "ema.start=0"]


def save_tiny_flux(root: Path, cfg) -> str:
    """The family's tiny FLUX (same seed on every call) saved as `root/transformer`: model.pretrained."""
    from models.families import get_family
    from trainer.config import replace

    tiny = replace(cfg, model=replace(cfg.model, tiny=True, dtype="bfloat16"))
    get_family("flux").load_network(tiny).save_pretrained(str(root / "transformer"))
    return str(root)


# ------------------------------------------------------------------------------------------ counting
class CommCounter:
    """Wraps the torch.distributed collectives (before DeepSpeed captures them) and DeepSpeed's parameter
    gathers (to know which parameters a gather carries). `end_iteration()` closes an iteration's tally."""

    def __init__(self, node_of: list[int]):
        self.node_of = node_of
        self.context: list = []  # parameters of the DeepSpeed gather in progress
        self.current: dict[str, float] = {}
        self.setup: dict[str, float] = {}
        self.iterations: list[dict[str, float]] = []
        self.unattributed = 0  # gathers whose bytes differ from the parameters' partitions (a counting error)
        self.names: dict[int, str] = {}
        self.per_param: dict[str, int] = {}  # gathers of each parameter over the iterations (a diagnostic)
        self.trainable: set[int] = set()

    def install(self) -> "CommCounter":
        import torch.distributed as dist

        kinds = {"all_gather_into_tensor": "gather", "_all_gather_base": "gather", "all_gather": "gather",
                 "reduce_scatter_tensor": "reduce_scatter", "_reduce_scatter_base": "reduce_scatter",
                 "reduce_scatter": "reduce_scatter", "all_reduce": "other", "broadcast": "broadcast",
                 "all_to_all_single": "other"}
        for name, kind in kinds.items():
            real = getattr(dist, name, None)
            if real is not None:
                setattr(dist, name, self._wrap(real, name, kind))
        return self

    def _wrap(self, real, name: str, kind: str):
        import torch

        def counted(*args, **kwargs):
            values = list(args) + list(kwargs.values())
            tensors = [v for v in values if torch.is_tensor(v)]
            lists = [v for v in values if isinstance(v, (list, tuple)) and v and torch.is_tensor(v[0])]
            if name in ("reduce_scatter_tensor", "_reduce_scatter_base"):
                nbytes = _nbytes(tensors[1])  # (output, input): the tensor reduced
            elif lists:
                nbytes = sum(_nbytes(t) for t in lists[0])
            else:
                nbytes = _nbytes(tensors[0])  # (output, input) for gathers: the gathered tensor
            source = tensors[1] if kind == "gather" and len(tensors) > 1 else None
            self._record(kind, nbytes, kwargs.get("group", _group_arg(name, args)), source)
            return real(*args, **kwargs)

        return counted

    def _record(self, kind: str, nbytes: int, group, source=None) -> None:
        import torch.distributed as dist

        ranks = list(range(dist.get_world_size())) if group is None else dist.get_process_group_ranks(group)
        cross = len({self.node_of[r] for r in ranks}) > 1
        parts = {kind: float(nbytes)}
        if kind == "gather":
            parts = self._split_gather(nbytes, set(ranks), source)
        bucket = self.current if self._in_iterations else self.setup
        for k, v in parts.items():
            bucket[k] = bucket.get(k, 0.0) + v
            if cross:
                bucket[k + "_cross_node"] = bucket.get(k + "_cross_node", 0.0) + v
            bucket[k + "_calls"] = bucket.get(k + "_calls", 0.0) + 1

    _in_iterations = False

    def _split_gather(self, nbytes: int, ranks: set[int], source=None) -> dict[str, float]:
        """Frozen / trainable share of one gather: the parameter whose partition is the collective's input
        (DeepSpeed's one-parameter gathers), else the parameters of the DeepSpeed gather in progress whose
        partition group is this collective's group (its coalesced gather), each its padded partition x group."""
        import torch.distributed as dist

        params = [p for p in self.context if set(dist.get_process_group_ranks(p.ds_process_group)) == ranks]
        if source is not None:
            own = [p for p in params if p.ds_tensor.data_ptr() == source.data_ptr()]
            params = own or params
        pay = {False: 0, True: 0}
        for p in params:  # (peft switches requires_grad off on the adapters while they are disabled)
            pay[id(p) in self.trainable] += int(p.ds_tensor.ds_numel) * len(ranks) * p.ds_tensor.element_size()
            name = self.names.get(id(p))
            if name is not None and self._in_iterations:
                self.per_param[name] = self.per_param.get(name, 0) + 1
        total = pay[False] + pay[True]
        if total == 0:
            return {"gather_other": float(nbytes)}
        if total != nbytes:
            self.unattributed += 1
        return {"gather_frozen": nbytes * pay[False] / total, "gather_trainable": nbytes * pay[True] / total}

    def watch(self, named, trainable) -> None:
        """Route every DeepSpeed gather entry point of these named ZeRO-3 parameters through `context`;
        `trainable`: the engine's trained parameters (the rest is frozen)."""
        self.trainable = {id(p) for p in trainable}
        for name, p in named:
            self.names[id(p)] = name
            if not hasattr(p, "ds_id"):
                continue
            for attr in ("all_gather_coalesced", "all_gather"):
                real = getattr(p, attr)
                setattr(p, attr, self._with_context(real, p))

    def _with_context(self, real, owner):
        def gather(*args, **kwargs):
            params = args[0] if args and isinstance(args[0], (list, tuple, set)) else kwargs.get("param_list")
            saved, self.context = self.context, list(params) if params is not None else [owner]
            try:
                return real(*args, **kwargs)
            finally:
                self.context = saved

        return gather

    def start_iterations(self) -> None:
        self._in_iterations = True

    def end_iteration(self) -> None:
        self.iterations.append(self.current)
        self.current = {}


def _group_arg(name: str, args: tuple):
    positions = {"all_gather_into_tensor": 2, "_all_gather_base": 2, "all_gather": 2, "reduce_scatter_tensor": 3,
                 "_reduce_scatter_base": 3, "reduce_scatter": 3, "all_reduce": 2, "broadcast": 2,
                 "all_to_all_single": 4}
    i = positions.get(name, 99)
    return args[i] if len(args) > i else None


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


# ------------------------------------------------------------------------------------------ one rank
def rank_worker(jobs: list[dict], per_node: int) -> list[dict[str, Any]]:
    """Run each job (a config dict) on this rank, counting collectives; returns one record per job."""
    import torch

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    os.environ.update(NODE_RANK=str(rank // per_node), LOCAL_RANK=str(rank % per_node),
                      LOCAL_WORLD_SIZE=str(per_node))
    counter = CommCounter([r // per_node for r in range(world)]).install()
    from cluster.student_group import cond_shapes_without_prompts
    from trainer import engine as engine_mod
    from trainer.config import config_from_dict
    from trainer.metrics import read_metrics
    from trainer.rank_program import run_rank

    built: dict[str, Any] = {}
    real_init, real_step = engine_mod.DeepSpeedEngine.__init__, engine_mod.DeepSpeedEngine.step

    def init(self, cfg, module):
        real_init(self, cfg, module)
        counter.watch(list(self._ds.module.named_parameters()), self.params)
        built["engine"] = self
        counter.start_iterations()

    def step(self, nonfinite=()):
        out = real_step(self, nonfinite)
        counter.end_iteration()
        return out

    engine_mod.DeepSpeedEngine.__init__, engine_mod.DeepSpeedEngine.step = init, step
    records = []
    for job in jobs:
        counter.setup, counter.iterations, counter.current, counter._in_iterations = {}, [], {}, False
        counter.per_param, counter.unattributed = {}, 0
        cfg = config_from_dict(job)
        torch.manual_seed(0)
        summary = run_rank(cfg, None, cond_shapes=cond_shapes_without_prompts(cfg))
        eng = built.pop("engine")
        trainable = sum(int(p.ds_numel) * p.ds_tensor.element_size() for p in eng.params)
        module = eng._ds.module
        frozen_params = [p for p in module.parameters() if not p.requires_grad]
        frozen = sum(int(getattr(p, "ds_numel", p.numel())) * (p.ds_tensor if hasattr(p, "ds_tensor") else p)
                     .element_size() for p in frozen_params)
        frozen += sum(module.get_buffer(n).numel() * module.get_buffer(n).element_size() for n in eng.frozen_buffers)
        losses = [r["loss"] for r in read_metrics(summary["metrics_path"]) if "loss" in r] if rank == 0 else []
        records.append({"rank": rank, "layout": [eng.layout.frozen, eng.layout.trainable],
                        "trainable_bytes": trainable, "frozen_bytes": frozen, "setup": counter.setup,
                        "iterations": counter.iterations, "losses": losses, "unattributed": counter.unattributed,
                        "gathers_per_param": dict(counter.per_param),
                        "memory_bytes": summary.get("memory_bytes", {})})
    return records


# ------------------------------------------------------------------------------------------ the runs
def measure(world: int, per_node: int, layouts: list[tuple], iters: int, workdir: Path) -> list[dict]:
    """One group of `world` ranks (`per_node` per loopback node) runs every layout (frozen_weights, trainable_comm,
    prefetch_blocks[, precision: the recipe's bf16 unless named]). Per iteration: the mean over the iterations after
    the first (the first also records DeepSpeed's module trace: see `first`)."""
    from tests.trainer.ds_spawn import run_ranks
    from trainer.config import load_config

    base = load_config(RECIPE)
    pretrained = save_tiny_flux(workdir / "flux_tiny", base)
    jobs = []
    for i, (frozen, trainable, prefetch, *precision) in enumerate(layouts):
        o = rehearsal_overrides(pretrained, str(workdir / f"run_{world}_{i}"), world, frozen, trainable, iters, prefetch)
        jobs.append(load_config(RECIPE, o + [f"train.precision={p}" for p in precision]).to_dict())
    per_rank = run_ranks(rank_worker, world, jobs, per_node, timeout=3600)
    rows = []
    for i, (frozen, trainable, prefetch, *precision) in enumerate(layouts):
        recs = [r[i] for r in per_rank]
        r0 = recs[0]
        its = r0["iterations"]
        steady = its[1:] or its
        mean = {k: sum(it.get(k, 0.0) for it in steady) / len(steady)
                for k in sorted({k for it in steady for k in it})}
        rows.append({"world": world, "gpus_per_node": per_node, "frozen_weights": frozen, "trainable_comm": trainable,
                     "prefetch_blocks": prefetch, "precision": jobs[i]["train"]["precision"],
                     "resolved": r0["layout"], "iterations": len(its),
                     "per_iteration": mean, "first": its[0], "per_iteration_each": its, "setup": r0["setup"],
                     "trainable_bytes": r0["trainable_bytes"], "frozen_bytes": r0["frozen_bytes"],
                     "losses": r0["losses"], "unattributed_gathers": sum(r["unattributed"] for r in recs),
                     "ranks_agree": all(r["iterations"] == its for r in recs),
                     "gathers_per_param": r0["gathers_per_param"], "memory_bytes": r0["memory_bytes"]})
    return rows


def _total(d: dict) -> float:
    return d.get("gather_frozen", 0.0) + d.get("gather_trainable", 0.0) + d.get("reduce_scatter", 0.0)


def bars(rows: list[dict]) -> dict[str, Any]:
    """Issue 23's bars on the measured rows, per world size (steady-state iterations)."""
    out = {}
    for world in sorted({r["world"] for r in rows}):
        rs = {(r["frozen_weights"], r["trainable_comm"], r["prefetch_blocks"]): r for r in rows
              if r["world"] == world and r["precision"] == "bf16"}  # the recipe's precision: the byte bars
        fp32 = {r["frozen_weights"]: r for r in rows if r["world"] == world and r["precision"] == "fp32"}
        rep = rs.get(("replicate", "per_step", 1.0))
        shard = next((r for k, r in rs.items() if k[:2] == ("shard", "per_step")), None)
        b: dict[str, Any] = {}
        if rep:
            b["replicate_frozen_gathered"] = rep["per_iteration"].get("gather_frozen", 0.0)
            b["replicate_total_over_trainable"] = _total(rep["per_iteration"]) / rep["trainable_bytes"]
            b["replicate_pass"] = b["replicate_frozen_gathered"] == 0 and b["replicate_total_over_trainable"] <= 3
        if rep and shard:  # reported: bf16 rounds the two layouts' gradient sums differently (LOSS_LAYOUTS)
            b["replicate_vs_shard_loss_diff_bf16"] = max(abs(a - c) for a, c in zip(rep["losses"], shard["losses"]))
        if "replicate" in fp32 and "shard" in fp32:
            a, c = fp32["replicate"]["losses"], fp32["shard"]["losses"]
            b["replicate_vs_shard_loss_diff"] = max(abs(x - y) for x, y in zip(a, c))
            b["losses_pass"] = b["replicate_vs_shard_loss_diff"] <= 1e-5 and len(a) == len(c) > 0
        # issue 21 item 7: building the student broadcasts its (small, seeded) trainables, never the frozen base
        # that is read from model.pretrained right after (zero.Init broadcast rank 0's random values of all of it)
        b["setup_broadcast_over_trainable"] = max(r["setup"].get("broadcast", 0.0) / r["trainable_bytes"]
                                                  for r in rs.values())
        b["setup_broadcast_pass"] = all(r["setup"].get("broadcast", 0.0) <= r["trainable_bytes"] + 1024
                                        for r in rs.values())
        nodes = [r for k, r in rs.items() if k[0] == "shard_in_node" and r["gpus_per_node"] < world]
        if nodes:
            b["shard_in_node_frozen_cross_node"] = max(r["per_iteration"].get("gather_frozen_cross_node", 0.0)
                                                       for r in nodes)
            b["shard_in_node_pass"] = b["shard_in_node_frozen_cross_node"] == 0
        exact = [r for r in rows if r["world"] == world and "planned" in r
                 and (r["prefetch_blocks"] == 0 or r["frozen_weights"] == "replicate")]  # both precisions
        if exact:
            b["planner_rows_compared"] = len(exact)
            b["planner_pass"] = all(all(r["planned"].get(k, 0.0) == r["per_iteration"].get(k, 0.0)
                                        for k in PLANNED_KEYS) for r in exact)
        out[str(world)] = b
    return out


PLANNED_KEYS = ("gather_frozen", "gather_trainable", "reduce_scatter", "gather_frozen_cross_node")


def with_plan(rows: list[dict], iters: int, workdir: Path) -> None:
    """The planner's prediction of each row's per-iteration bytes (trainer/planner/time_plan.py), beside the measurement."""
    from trainer.config import load_config
    from trainer.planner.time_plan import comm_bytes, trace_passes

    traced = None
    for r in rows:
        o = rehearsal_overrides(str(workdir / "flux_tiny"), str(workdir / "plan"), r["world"], r["frozen_weights"],
                                r["trainable_comm"], iters, r["prefetch_blocks"])
        cfg = load_config(RECIPE, o + [f"train.precision={r['precision']}"])
        traced = traced or trace_passes(cfg)
        r["planned"] = comm_bytes(cfg, r["world"], r["gpus_per_node"], r["frozen_weights"], r["trainable_comm"],
                                  traced)


def table(rows: list[dict]) -> str:
    head = (f"{'ranks':>5} {'frozen_weights':<14} {'trainable':<9} {'prec':<4} {'prefetch':>8} {'frozen AG':>10} {'train AG':>9} "
            f"{'RS':>8} {'x-node frz':>10} {'total/trainable':>15} {'planned':>9} {'loss[-1]':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        pi = r["per_iteration"]
        planned = f"{_total(r['planned']) / 1e3:.1f}kB" if "planned" in r else "-"
        lines.append(f"{r['world']:>5} {r['frozen_weights']:<14} {r['trainable_comm']:<9} {r['precision']:<4} {r['prefetch_blocks']:>8g} "
                     f"{pi.get('gather_frozen', 0) / 1e3:>8.1f}kB {pi.get('gather_trainable', 0) / 1e3:>7.1f}kB "
                     f"{pi.get('reduce_scatter', 0) / 1e3:>6.1f}kB {pi.get('gather_frozen_cross_node', 0) / 1e3:>8.1f}kB "
                     f"{_total(pi) / r['trainable_bytes']:>15.2f} {planned:>9} "
                     f"{r['losses'][-1] if r['losses'] else float('nan'):>10.6f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the suite's quick run: 4 ranks as 2 nodes, 3 layouts, 2 iterations")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "comm_volume.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="comm_volume_") as tmp:
        work = Path(tmp)
        if args.tiny:
            rows = measure(4, 2, QUICK_LAYOUTS + LOSS_LAYOUTS, 2, work)
        else:
            rows = (measure(2, 2, LAYOUTS + LOSS_LAYOUTS, args.iters, work)
                    + measure(4, 2, LAYOUTS + LOSS_LAYOUTS, args.iters, work))
        with_plan(rows, args.iters, work)
    result = {"recipe": str(RECIPE.relative_to(ROOT)), "rows": rows, "bars": bars(rows),
              "note": "bytes per iteration and rank: all-gathers count the gathered tensor, reduce-scatters the "
                      "tensor reduced; CPU, gloo; tiny width, the recipe's layout otherwise"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(rows))
    print(json.dumps(result["bars"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
