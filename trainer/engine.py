"""The optimisation engines: DeepSpeed ZeRO-3 here (the only module that imports deepspeed); the single-process
torch engine and what both share (LR schedule, clipping, checkpoint slots) in trainer/torch_engine.py.

`build_engine(cfg, module)` returns an object with one small interface, so the loop does not care whether
it runs a plain single-process torch optimiser (`train.engine: torch`, toy runs) or a DeepSpeed ZeRO-3
engine (`train.engine: deepspeed`):

    engine.module            the (possibly wrapped) trainable module; call it for the forward
    engine.backward(loss)    accumulate gradients of one segment's loss
    engine.step(nonfinite) -> dict   clip, optimiser step, LR schedule, zero grads; returns {"grad_norm", "lr",
                             "skipped", "nonfinite"}: the step is skipped on every rank when any rank saw a
                             non-finite loss or teacher output (`nonfinite`, agreed by an all-reduce) or the
                             global grad norm is not finite
    engine.slots() / engine.local_state() / engine.load_local_state(tensors, meta)
                             this rank's flat partition of every trained parameter (fp32 master, Adam moments)
                             and where it lies in the flattened full tensor: the checkpoint format
                             (trainer/checkpoint/store.py) reshards from these, with no pickle and no DeepSpeed files
    engine.any_rank(flag)    True on every rank when `flag` is True on any rank

The DeepSpeed engine adds the ZeRO-3 hooks: `partitioned_construction(cfg)` (build the student
partitioned), `load_partitioned(module, tensors)` (student-from-teacher init, one tensor at a time),
`engine.local_master(p)` (the fp32 partition for a sharded EMA), `engine.refresh_gathered()` (after a write to
the partitions of trainables kept gathered) and `engine.gathered_state_dict()`.

Where the weights live (issue 23, docs/performance.md) is `engine_layout(cfg)`: a LoRA run's frozen base
replicated as plain buffers, ZeRO-3 partitioned within a node or over all ranks (`train.frozen_weights`), and
the trainables gathered and reduced per pass or once per step (`train.trainable_comm`), resolved by the memory
plan when `auto`. `trunk_construction` builds the trunk accordingly, without zero.Init's broadcast of values
that a weights file overwrites.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from trainer.config import Config
from trainer.layout import DEFAULT_PREFETCH_NUMEL, engine_layout, node_group
from trainer.torch_engine import (ADAM_STATES, NONFINITE_KINDS, Slot, TorchEngine, apply_lr, grad_clip_for,
                                  verify_gradient_checkpointing)


# ------------------------------------------------------------------------------------------ DeepSpeed ZeRO-3
def _import_deepspeed():
    """Import deepspeed lazily with the CPU fixes of STACK.md (accelerator, no shm op JIT build)."""
    import os
    import sys
    import warnings

    # torch 2.13 deprecates the collectives ZeRO-3 calls every step; one line per call drowns the logs.
    warnings.filterwarnings("ignore", message=r".*`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`"
                            r" is deprecated", category=FutureWarning)
    if not torch.cuda.is_available():
        # Must be set before deepspeed picks its accelerator (at first import).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (registers the module we patch below)

    # The shm comm op only serves inference all-reduce; building it costs ~50 s of g++ on first use.
    # Patch through sys.modules: the attribute path resolves to the torch module, not ours.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def micro_batch_and_accumulation(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, gradient-accumulation steps) for the global `train.batch_size`."""
    global_batch = cfg.train.batch_size
    micro = cfg.train.micro_batch_size or global_batch // world_size
    if micro < 1 or global_batch % (micro * world_size) != 0:
        raise ValueError(
            f"train.batch_size {global_batch} is not a multiple of micro_batch_size {micro} x world size {world_size}"
        )
    return micro, global_batch // (micro * world_size)


def deepspeed_config(cfg: Config, world_size: int, prefetch_numel: int = DEFAULT_PREFETCH_NUMEL) -> dict[str, Any]:
    """The DeepSpeed config, generated from ours (no separate DeepSpeed JSON to keep in sync).

    - `managed_gradient_accumulation: false`: every `step()` is the accumulation boundary, so the loop may call
      `backward` any number of times per step (one per data-free segment, per micro-batch).
    - `gradient_clipping` is set so that ZeRO computes the clip, but the engine switches it on only from
      `optim.grad_clip_start` (DeepSpeed's own clipping is static; see `DeepSpeedEngine._set_clip`).
    - `stage3_param_persistence_threshold: 0`: no parameter stays gathered by size; the trainables of
      `train.trainable_comm: per_step` are kept gathered by the engine itself, which re-gathers them after every
      write to their partitions (EMA swap, checkpoint load), so the next forward always sees the write.
    - `overlap_comm` and a prefetch bucket of `train.prefetch_blocks` blocks (`prefetch_numel`): on a GPU the
      next block's gather runs on its own stream while this block computes. On CPU (gloo) DeepSpeed's
      accelerator is synchronous: the same gathers run in the same order, one after the other. Prefetching
      also keeps a parameter gathered when its next use lies inside the prefetch window (fewer bytes than one
      gather per use: docs/performance.md).
    - `stage3_max_reuse_distance: 0`: a gathered parameter is released right after its module ran, whatever the
      model's size (DeepSpeed's default keeps parameters reused within 1e9 elements, which keeps a whole tiny
      model gathered across passes but not a 12B one): bytes per pass then scale with the model, so what
      `benchmarks/comm_volume.py` measures at reduced size is what `piflow plan` predicts at full size.
    - `memory_efficient_linear: false`: zero.Init would otherwise replace torch's linear for the process.
    """
    micro, accum = micro_batch_and_accumulation(cfg, world_size)
    prefetch = int(prefetch_numel)
    return {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "managed_gradient_accumulation": False,
        "gradient_clipping": max(cfg.optim.grad_clip, 0.0),
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "stage3_prefetch_bucket_size": prefetch,
            "stage3_max_reuse_distance": 0,
            "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": False,
            "memory_efficient_linear": False,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Client AdamW: torch's (no JIT build), or bitsandbytes' 8-bit AdamW on GPU (`optim.eightbit`)."""
    kwargs = dict(lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    if not cfg.optim.eightbit:
        return torch.optim.AdamW(params, **kwargs)
    if not torch.cuda.is_available():
        raise RuntimeError("optim.eightbit: true needs a CUDA GPU (bitsandbytes AdamW8bit); set it to false on CPU")
    try:
        import bitsandbytes
    except ImportError:
        raise RuntimeError(
            "optim.eightbit: true needs the bitsandbytes package (pip install bitsandbytes); "
            "or set optim.eightbit: false for torch AdamW"
        ) from None
    return bitsandbytes.optim.AdamW8bit(params, **kwargs)


def _is_partitioned(p: torch.Tensor) -> bool:
    return getattr(p, "ds_tensor", None) is not None


@torch.no_grad()
def load_partitioned(module: torch.nn.Module, tensors: Mapping[str, Callable[[], torch.Tensor]] | Any,
                     strict: bool = True) -> list[str]:
    """Copy full tensors into the local ZeRO-3 partitions, one tensor at a time.

    `tensors` maps a parameter/buffer name of `module` to its full value: a `safetensors.safe_open` handle
    (read lazily with `get_tensor`), or a dict of tensors. Each rank reads a tensor, keeps only its flat
    slice and drops the rest, so no rank ever holds the whole model (and there is no communication).
    Works on non-partitioned modules too (then it is a plain copy). Returns the names that were missing.
    """
    keys = set(tensors.keys())
    missing = []
    # Non-persistent buffers (e.g. DiT's sin-cos `pos_embed.pos_embed`) are never in a weights file: the
    # constructor computes them, so they are kept as built.
    derived = {f"{prefix}.{b}" if prefix else b for prefix, sub in module.named_modules()
               for b in sub._non_persistent_buffers_set}

    def get(name: str) -> torch.Tensor:
        return tensors.get_tensor(name) if hasattr(tensors, "get_tensor") else tensors[name]

    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        if name not in keys:
            if name not in derived:
                missing.append(name)
            continue
        full = get(name)
        if tuple(full.shape) != tuple(getattr(p, "ds_shape", p.shape)):
            raise ValueError(f"load_partitioned: '{name}' has shape {tuple(full.shape)} in the source, "
                             f"{tuple(getattr(p, 'ds_shape', p.shape))} in the model")
        if not _is_partitioned(p):
            p.data.copy_(full.to(p.dtype))
            continue
        import torch.distributed as dist

        part = p.ds_tensor  # (ds_tensor.ds_numel,) flat slice of the padded flattened parameter
        n = part.ds_numel
        rank = dist.get_rank(group=p.ds_process_group)
        flat = full.reshape(-1)
        start, end = rank * n, min((rank + 1) * n, flat.numel())
        part.zero_()
        if start < end:
            part[: end - start].copy_(flat[start:end].to(part.dtype))
    if strict and missing:
        raise KeyError(f"load_partitioned: {len(missing)} names missing in the source, e.g. {missing[:5]}")
    return missing


def safetensors_source(path: str | Path) -> "_SafetensorsSource":
    """Lazy name -> tensor view of a diffusers weights location: one `.safetensors` file, or a directory with
    one file or a sharded `*.safetensors.index.json`. Tensors are read one at a time on `get_tensor`."""
    return _SafetensorsSource(Path(path))


class _SafetensorsSource:
    def __init__(self, path: Path):
        import json

        from safetensors import safe_open

        if path.is_file():
            files = [path]
        else:
            index = sorted(path.glob("*.safetensors.index.json"))
            if index:
                weight_map = json.loads(index[0].read_text())["weight_map"]
                files = sorted({path / f for f in weight_map.values()})
            else:
                files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors weights at {path}")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def keys(self):
        return self._where.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


def _plain_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A non-ZeRO copy of a (gathered) module: fresh Parameters without ZeRO attributes (whose process-group
    handles cannot be deep-copied), the rest of the module deep-copied."""
    import copy

    saved = []
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                saved.append((sub, name, p))
                sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    try:
        return copy.deepcopy(module)
    finally:
        for sub, name, p in saved:
            sub._parameters[name] = p


def build_partitioned_student(cfg: Config, build_trunk: Callable[[], torch.nn.Module], weights: Any,
                              plain_modules: tuple[str, ...],
                              build_student: Callable[[torch.nn.Module], torch.nn.Module]) -> torch.nn.Module:
    """Student-from-teacher construction without materialising the trunk on any rank (ZeRO-3).

    1. `build_trunk()` runs where the layout puts the frozen base (`trunk_construction`): under
       `deepspeed.zero.Init`, every weight partitioned as soon as it exists (over all ranks, or the ranks of
       this node), or as a plain replica on this rank's device (`train.frozen_weights: replicate`);
    2. the teacher's weights (`weights`, e.g. `safetensors_source(dir)`) are copied into the partitions one
       tensor at a time (`load_partitioned`);
    3. the small output modules the student replaces or copies (`plain_modules`, e.g. FLUX's `norm_out`,
       `proj_out`) are gathered once and swapped for ordinary copies, so the head initialisation
       (PIFLOW.md §2.2) reads real values;
    4. `build_student(trunk)` adds the head, the tail and LoRA as ordinary modules; the engine places those
       when it is built (`DeepSpeedEngine._place_weights`).
    With `train.engine: torch` the same steps run without partitioning.
    """
    with trunk_construction(cfg, loaded=weights is not None):
        trunk = build_trunk()
    if weights is not None:  # None: keep the constructed values (tiny seeded models, identical on every rank)
        load_partitioned(trunk, weights)
    if cfg.train.engine == "deepspeed":
        ds = _import_deepspeed()
        for name in plain_modules:
            parent_name, _, leaf = name.rpartition(".")
            parent = trunk.get_submodule(parent_name) if parent_name else trunk
            module = getattr(parent, leaf)
            if not any(_is_partitioned(p) for p in module.parameters()):
                continue  # a replicated trunk is plain already
            with ds.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                plain = _plain_copy(module)
            setattr(parent, leaf, plain)
    return build_student(trunk)


class DeepSpeedEngine:
    """ZeRO-3 engine (one per rank) with the same interface as `TorchEngine`.

    Clipping and warm-up (PIFLOW.md §5) are ours: the LR is written into the optimiser's param groups
    before each step (as in `TorchEngine`), and the clip threshold is switched on from `grad_clip_start` by
    setting the ZeRO optimiser's `clip_grad` (the "scheduler hook"), so DeepSpeed's fused norm+clip is used.
    """

    def __init__(self, cfg: Config, module: torch.nn.Module):
        ds = _import_deepspeed()
        ensure_distributed(cfg)
        import torch.distributed as dist

        self.cfg = cfg
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.layout = engine_layout(cfg)
        self.ds_config = deepspeed_config(cfg, self.world_size, self.layout.prefetch_numel)
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("build_engine: the student has no trainable parameters")
        if cfg.train.precision == "bf16":
            # ZeRO-3 bf16 keeps ONE dtype per parameter group (its defragment asserts it) and the fp32 master
            # copy itself: the trainables that were built in fp32 (policy head, norm_out copy, LoRA) become
            # bf16 model weights like the trunk; the optimiser steps their fp32 masters.
            for p in params:
                if p.dtype != torch.bfloat16:
                    p.data = p.data.to(torch.bfloat16)
        self.frozen_buffers = self._place_weights(ds, module, params)
        optimizer = make_optimizer(cfg, params)
        self._ds, self.optimizer, _, _ = ds.initialize(model=module, optimizer=optimizer, config=self.ds_config)
        self.module = self._ds  # calling it runs the forward with ZeRO-3's gather hooks
        self.named = [(n, p) for n, p in self._ds.module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.global_step = 0  # iterations done, skipped ones included (the LR schedule follows iterations)
        self.skipped_steps = 0
        self._force_skip = False
        self._install_skip_hook()
        self.per_step = self.layout.trainable == "per_step"
        if self.per_step:
            self._keep_trainables_gathered()
            self._unhook_gathered_modules()
        self._set_lr()

    # ---- where the weights live (issue 23, docs/performance.md)
    def _place_weights(self, ds, module: torch.nn.Module, trainables: list[torch.nn.Parameter]) -> list[str]:
        """Place every weight before `deepspeed.initialize` sees the module (it would partition all of them over
        all ranks): frozen weights that are still plain become buffers of this rank's device (`replicate`: ZeRO-3
        never gathers them), or ZeRO-3 parameters of this node's group (`shard_in_node`) or of all ranks
        (`shard`); the trainables become ZeRO-3 parameters of all ranks, broadcast from rank 0 (they are small
        and built by seeded code, but a rank whose construction drew other numbers must not train silently
        apart). Returns the names of the frozen weights kept as buffers."""
        frozen = {}  # id -> (param, [(module, name)]) of plain frozen parameters, shared ones once
        for sub in module.modules():
            for name, p in sub._parameters.items():
                if p is not None and not p.requires_grad and not _is_partitioned(p):
                    frozen.setdefault(id(p), (p, []))[1].append((sub, name))
        buffers = []
        if self.cfg.lora.enabled and self.layout.frozen == "replicate":
            dtype = torch.bfloat16 if self.cfg.train.precision == "bf16" else torch.float32  # as zero.Init stores
            names = {id(sub): prefix for prefix, sub in module.named_modules()}
            for p, owners in frozen.values():
                tensor = p.detach().to(dtype)
                for sub, name in owners:
                    del sub._parameters[name]
                    sub.register_buffer(name, tensor)
                    buffers.append(f"{names[id(sub)]}.{name}".lstrip("."))
        else:  # the plain frozen copies of output modules, gathered from the partitions: equal on every rank
            group = node_group(self.cfg) if self.cfg.lora.enabled and self.layout.frozen == "shard_in_node" else None
            _partition(ds, [p for p, _ in frozen.values()], group, self.ds_config, broadcast=False)
        _partition(ds, [p for p in trainables if not _is_partitioned(p)], None, self.ds_config)
        return buffers

    def _keep_trainables_gathered(self) -> None:
        """`train.trainable_comm: per_step`: the trainables stay gathered (DeepSpeed's persistent parameters, which
        its optimizer step re-gathers once after each update) and their gradients accumulate locally over the
        step's backwards (DeepSpeed's coalesced reduction), reduce-scattered once in `step()`."""
        for p in self.params:
            p.ds_persist = True
        persistent = self.optimizer.persistent_parameters  # the list ZeRO-3's step re-gathers (shared with its hooks)
        persistent.extend(p for p in self.params if all(p is not q for q in persistent))
        self.params[0].all_gather(self.params)
        self.optimizer._coalesce_grad_reduction = True

    def _unhook_gathered_modules(self) -> None:
        """per_step: a module whose parameters are all trainables (kept gathered) or buffers needs none of ZeRO-3's
        per-module hooks (fetch before forward and backward, release after, their bookkeeping): they cost a rank
        more CPU than the demo's whole forward and backward (benchmarks/demo_step.py). Remove them, as DeepSpeed's
        own `unwrap_model_for_generation` does for a gathered model; modules holding partitioned frozen weights
        keep theirs. Gradient reduction hangs on the parameters, not on these hooks."""
        whole: set[int] = set()

        def visit(m: torch.nn.Module) -> None:
            if all(p.requires_grad for p in m.parameters()):
                whole.update(id(d) for sub in m.modules() for d in (sub._forward_pre_hooks, sub._forward_hooks))
            else:
                for child in m.children():
                    visit(child)

        visit(self._ds.module)
        offload = self.optimizer.parameter_offload
        for kind in ("forward_hooks", "backward_hooks"):
            kept = []
            for handle in getattr(offload, kind):
                if id(handle.hooks_dict_ref()) in whole:
                    handle.remove()
                else:
                    kept.append(handle)
            setattr(offload, kind, kept)

    def refresh_gathered(self) -> None:
        """After a write to the trainables' partitions (EMA swap, checkpoint load), re-gather the copies kept
        whole (per_step) so the next forward sees the write. Collective; a no-op for per_pass."""
        if self.per_step:
            self.params[0].partition(param_list=self.params)
            self.params[0].all_gather(self.params)

    def _reduce_accumulated_grads(self) -> None:
        """per_step: the one reduce-scatter of the step, over the gradients every backward since the last step
        accumulated on the (whole) parameters, into ZeRO-3's gradient partitions (copied, not added)."""
        opt = self.optimizer
        opt._coalesce_grad_reduction = False
        try:
            opt.micro_step_id = 0
            for group in opt.fp16_groups:
                for p in group:
                    if p.requires_grad:
                        if p.grad is None:  # unused this step: a zero gradient, not the last step's partition
                            p.grad = torch.zeros_like(p)
                        opt.reduce_ready_partitions_and_remove_grads(p)
            opt.independent_gradient_partition_epilogue()
        finally:
            opt._coalesce_grad_reduction = True

    # ---- the engine interface
    def _set_lr(self) -> float:
        return apply_lr(self.cfg, self.optimizer, self.global_step)

    def _set_clip(self) -> float:
        max_norm = grad_clip_for(self.cfg, self.global_step)
        self.optimizer.clip_grad = 0.0 if math.isinf(max_norm) else max_norm  # 0 = off in ZeRO
        return max_norm

    def backward(self, loss: torch.Tensor) -> None:
        # Sum of gradients over calls (the loop weights segment and micro-batch losses itself); the mean over
        # ranks is DeepSpeed's reduce-scatter, so each rank's loss is the mean over its local batch.
        # per_step: no reduction at the end of this backward (gradients stay on the parameters until step())
        self._ds.inside_no_sync_ctxt = self.per_step
        try:
            self._ds.backward(loss, scale_wrt_gas=False)
        finally:
            self._ds.inside_no_sync_ctxt = False
        # ZeRO-3 switches from "copy" to "accumulate" into the gradient partitions when this flag is cleared,
        # which DeepSpeed only does at the start of its own forward. Our loop may run several backwards with no
        # forward in between (overlap: fwd_0 fwd_1 bwd_0 bwd_1), and calls the student's methods directly, so
        # clear it after every backward: each call then adds to the gradients instead of overwriting them.
        self.optimizer.clear_backward_seen_flag()

    def any_rank(self, flag: bool) -> bool:
        import torch.distributed as dist

        from trainer.distributed import collective_device

        t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def step(self, nonfinite: Sequence[str] = ()) -> dict[str, Any]:
        """One optimiser step, or a skipped one on EVERY rank when any rank reports a non-finite quantity
        (`nonfinite`: names such as "loss", "teacher"; one all-reduce agrees on them) or the global grad norm
        is not finite. A skip goes through ZeRO-3's own overflow path (gradients dropped, no update, Adam
        state untouched): DeepSpeed takes that path by itself only for fp16 overflow and non-finite norms."""
        import torch.distributed as dist

        from trainer.distributed import collective_device

        flags = torch.tensor([1.0 if name in nonfinite else 0.0 for name in NONFINITE_KINDS], device=collective_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank must take the same branch below
        reasons = [name for name, f in zip(NONFINITE_KINDS, flags.tolist()) if f > 0]
        lr = self._set_lr()
        self._set_clip()
        self._force_skip = bool(reasons)
        if self.per_step:
            self._reduce_accumulated_grads()
        try:
            self._ds.step()
        finally:
            self._force_skip = False
        grad_norm = self._ds.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        skipped = bool(getattr(self.optimizer, "overflow", False))
        if skipped and not reasons:
            reasons = ["grad_norm"]  # ZeRO-3 found the (all-reduced) global norm non-finite and skipped
        if skipped:
            self.skipped_steps += 1
        self._ds.zero_grad()
        self.global_step += 1
        return {"grad_norm": grad_norm, "lr": lr, "skipped": skipped, "nonfinite": reasons}

    def _install_skip_hook(self) -> None:
        """Make ZeRO-3's overflow check also report our agreed skip flag (bf16/fp32 have no loss-scale overflow
        check of their own), so a skipped step runs DeepSpeed's own clean-up of the partitioned gradients."""
        opt = self.optimizer
        check = opt._overflow_check_and_loss_scale_update

        def check_with_skip(update_scale: bool = True) -> bool:
            result = check(update_scale=update_scale)
            if self._force_skip:
                opt.overflow = True
                if update_scale:  # (unused by stage 3's step, which cleans up in a second call)
                    return opt._loss_scale_update_and_overflow_cleanup()
                return True
            return result

        opt._overflow_check_and_loss_scale_update = check_with_skip

    # ---- sharded views for EMA and checks
    def local_master(self, p: torch.nn.Parameter) -> torch.Tensor:
        """This rank's fp32 master partition of parameter `p` (flat), for a sharded EMA."""
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p)

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds, measured on the tensors themselves (not RSS): weight partitions (trainable and
        frozen), the gradient partition buffer, the optimiser's fp32 master partitions and Adam moments."""
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
        module = self._ds.module
        parts = lambda train: [getattr(p, "ds_tensor", p) for p in module.parameters()  # noqa: E731
                               if p.requires_grad == train]
        opt = self.optimizer
        adam = [t for state in opt.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        frozen = parts(False) + [module.get_buffer(n) for n in self.frozen_buffers]
        return {"weights_trainable": nbytes(parts(True)), "weights_frozen": nbytes(frozen),
                "grads": nbytes([getattr(opt, "grad_partitions_flat_buffer", None)]),
                "master": nbytes(getattr(opt, "fp32_partitioned_groups_flat", [])),
                "adam": nbytes([t for t in adam if t.dim() > 0]),
                "trainables_whole": nbytes([p.data for p in self.params]) if self.per_step else 0}

    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights of the trainable module (collective: call on every rank; every rank gets a copy)."""
        ds = _import_deepspeed()
        out = {}
        module = self._ds.module
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        for name, p in module.named_parameters():
            if getattr(p, "ds_persist", False) and p.ds_status == ZeroParamStatus.AVAILABLE:
                out[name] = p.detach().clone().cpu()  # kept whole (per_step) and current: no gather, no release
                continue
            with ds.zero.GatheredParameters([p], modifier_rank=None):
                out[name] = p.detach().clone().cpu()
        for name, b in module.named_buffers():
            out[name] = b.detach().clone().cpu()
        return out

    # ---- checkpoint state: this rank's flat partitions (ZeRO-3 pads each parameter to world x partition)
    def slots(self) -> list[Slot]:
        import torch.distributed as dist

        out = []
        for n, p in self.named:
            length = int(p.ds_tensor.ds_numel)
            rank = dist.get_rank(group=p.ds_process_group)
            out.append(Slot(n, tuple(p.ds_shape), int(p.ds_numel), rank * length, length))
        return out

    def _fp32_groups(self) -> list[torch.Tensor]:
        return list(self.optimizer.fp32_partitioned_groups_flat)

    def adam_step(self) -> int:
        state = self.optimizer.optimizer.state
        steps = [int(state[g]["step"]) for g in self._fp32_groups() if "step" in state.get(g, {})]
        return max(steps, default=0)

    def counters(self) -> dict[str, int]:
        return {"global_step": self.global_step, "skipped_steps": self.skipped_steps, "adam_step": self.adam_step()}

    def local_state(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        have_moments = self.adam_step() > 0
        out = {}
        for n, p in self.named:
            out[f"master/{n}"] = safe_get_local_fp32_param(p).detach().reshape(-1).float().cpu().clone()
            for key in ADAM_STATES:
                out[f"{key}/{n}"] = (safe_get_local_optimizer_state(p, key).detach().reshape(-1).float().cpu().clone()
                                     if have_moments else torch.zeros(int(p.ds_tensor.ds_numel)))
        return out

    def frozen_state(self) -> dict[str, torch.Tensor]:
        return {}  # frozen weights come from the teacher (model.pretrained or the seeded tiny model)

    @torch.no_grad()
    def load_local_state(self, tensors: Mapping[str, torch.Tensor], counters: Mapping[str, int],
                         frozen: Mapping[str, torch.Tensor] | None = None) -> None:
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        self.global_step, self.skipped_steps = int(counters["global_step"]), int(counters["skipped_steps"])
        adam_step = int(counters["adam_step"])
        state = self.optimizer.optimizer.state
        for g in self._fp32_groups():  # torch AdamW creates its state lazily at the first step: create it here
            if adam_step > 0:
                st = state[g]
                st["step"] = torch.tensor(float(adam_step))
                for key in ADAM_STATES:
                    if key not in st:
                        st[key] = torch.zeros_like(g)
            else:
                state.pop(g, None)
        for n, p in self.named:
            master = tensors[f"master/{n}"]
            safe_set_local_fp32_param(p, master.to(self.local_master(p).dtype))
            p.ds_tensor.data.copy_(master.to(p.ds_tensor.dtype))  # the (bf16/fp32) partition the forward gathers
            if adam_step > 0:
                for key in ADAM_STATES:
                    safe_set_local_optimizer_state(p, tensors[f"{key}/{n}"].to(master.dtype), key)
        self.refresh_gathered()
        self._set_lr()

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """Every rank's fp32 master partitions are finite (collective)."""
        bad = any(not bool(torch.isfinite(self.local_master(p)).all()) for p in self.params)
        return not self.any_rank(bad)


def ensure_distributed(cfg: Config) -> None:
    """Join the process group (Ray Train or torchrun already built it: DeepSpeed then reuses it)."""
    import torch.distributed as dist

    ds = _import_deepspeed()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        ds.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    else:
        ds.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


@contextlib.contextmanager
def partitioned_construction(cfg: Config) -> Iterator[None]:
    """Build the student inside this context so that each parameter is partitioned as soon as it is created
    (`deepspeed.zero.Init`): no rank ever holds the whole student. A no-op for `train.engine: torch`."""
    if cfg.train.engine != "deepspeed":
        yield
        return
    ds = _import_deepspeed()
    ensure_distributed(cfg)
    import torch.distributed as dist

    ds_config = deepspeed_config(cfg, dist.get_world_size())
    with ds.zero.Init(config_dict_or_path=ds_config):  # dtype from the config: bf16 or fp32
        yield


# ------------------------------------------------------------------ where the weights live (issue 23)
def _partition(ds, params: list[torch.nn.Parameter], group: Any, ds_config: dict[str, Any],
               broadcast: bool = True) -> None:
    """Turn plain parameters into ZeRO-3 parameters partitioned over `group` (None: all ranks), in place;
    rank 0's values broadcast first unless the caller knows they are equal on every rank."""
    if not params:
        return
    init = _loading_init(ds)(config_dict_or_path=ds_config, data_parallel_group=group)
    init.skip_broadcast = not broadcast
    try:
        init._convert_to_zero_parameters(params)
    finally:
        init.skip_broadcast = False


_LOADING_INIT: list[type] = []


def _loading_init(ds) -> type:
    """`deepspeed.zero.Init` for a trunk whose every weight is read from a file right after construction: it
    skips the broadcast of rank 0's freshly initialised values that zero.Init does before partitioning each
    parameter (12B random weights for FLUX, all overwritten by `load_partitioned`). `skip_broadcast` is cleared
    once the weights are loaded, so later conversions through this context broadcast as usual."""
    if not _LOADING_INIT:
        class LoadingInit(ds.zero.Init):
            skip_broadcast = False

            def _zero_init_param(self, param):
                if not self.skip_broadcast:
                    return super()._zero_init_param(param)
                self._convert_to_deepspeed_param(param)
                param.partition()

        _LOADING_INIT.append(LoadingInit)
    return _LOADING_INIT[0]


@contextlib.contextmanager
def trunk_construction(cfg: Config, loaded: bool) -> Iterator[None]:
    """Build the teacher trunk where the layout puts its weights: a plain replica on this rank's device (a LoRA
    run's `replicate`; the engine turns the frozen weights into buffers), or ZeRO-3 partitions over the ranks
    of this node (`shard_in_node`) or all ranks. `loaded`: every weight is overwritten from a file right after,
    so nothing is broadcast. A no-op for `train.engine: torch`."""
    if cfg.train.engine != "deepspeed":
        yield
        return
    ds = _import_deepspeed()
    ensure_distributed(cfg)
    import torch.distributed as dist

    layout = engine_layout(cfg)
    if cfg.lora.enabled and layout.frozen == "replicate":
        from trainer.distributed import device_for, rank_info

        with torch.device(device_for(rank_info())):
            yield
        return
    group = node_group(cfg) if cfg.lora.enabled and layout.frozen == "shard_in_node" else None
    init = _loading_init(ds)(config_dict_or_path=deepspeed_config(cfg, dist.get_world_size(), layout.prefetch_numel),
                             data_parallel_group=group)
    init.skip_broadcast = loaded
    try:
        with init:
            yield
    finally:
        init.skip_broadcast = False


def build_engine(cfg: Config, module: torch.nn.Module) -> TorchEngine | DeepSpeedEngine:
    verify_gradient_checkpointing(cfg, module)
    if cfg.train.engine == "torch":
        return TorchEngine(cfg, module)
    if cfg.train.engine == "deepspeed":
        return DeepSpeedEngine(cfg, module)
    raise ValueError(f"train.engine: unknown engine {cfg.train.engine!r} (expected torch or deepspeed)")
