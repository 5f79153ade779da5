"""The program one student rank runs under `train.engine: deepspeed` (Ray Train worker, torchrun, or a test
launcher): build the student partitioned from the teacher's weights, the ZeRO-3 engine, the sharded power
EMA, then run `train_loop` with the teacher it is given. No ray here: the teacher arrives as an object
(`cluster.teacher_server.RemoteTeacher` in separate placement; None in shared placement, where the teacher is
the student's own LoRA base with the adapters off), the prompt batches as an iterator factory.

`run_rank` is the whole run of one rank, as `trainer/local_run.py` is for one process: fresh start or exact
resume (`trainer/checkpoint/resume.py`: engine shards, EMA shard, RNGs, data cursor), batches from the prompt feed
(noise a function of the global sample index) or data-free synthetic ones, a checkpoint every
`train.ckpt_every` steps, validation rollouts every `eval.every` steps (all ranks sample, rank 0 writes),
metrics with the loss averaged over ranks, and a per-rank log of the consumed sample keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from data_pipeline.compact import EmbeddingBatch
from data_pipeline.records import LATENT_KEY
from models.piid import DataSegments
from models.timesteps import sample_segment_of
from trainer.config import Config, ConfigError
from models.sample_rng import SampleRNG, sample_key
from trainer.distributed import RankInfo, device_for, global_positions, rank_info
from trainer.ema import PowerEMA
from trainer.engine import build_engine, build_partitioned_student, safetensors_source
from trainer.fault_injection import with_injected_faults


@dataclass
class RankSetup:
    info: RankInfo
    family: Any
    student: torch.nn.Module
    teacher: Any  # callable teacher(x, sigma, cond) -> u; `.submit` when remote
    engine: Any
    ema: PowerEMA
    device: torch.device  # where the student's weights live: every tensor it consumes is made or moved there


def teacher_weights_dir(cfg: Config) -> Optional[Path]:
    """Where the teacher transformer's safetensors live (None for `model.tiny` without `model.pretrained`)."""
    if not cfg.model.pretrained:
        return None
    from trainer.weights import local_model_dir

    # a hub id / s3:// dir: this node's copy (issue 11) of the transformer's files only (issue 21)
    root = Path(local_model_dir(cfg.model.pretrained, cfg, ("transformer",)))
    path = root / cfg.model.subfolder if cfg.model.subfolder else root
    if not path.exists():
        raise ConfigError(f"model.pretrained: {path} does not exist (a diffusers-format dir with the teacher, "
                          "a hub id or an s3:// dir)")
    return path


def build_rank(cfg: Config, remote_teacher: Any = None) -> RankSetup:
    """Student, teacher, engine and EMA of this rank (collective: every rank calls it)."""
    from models.families import get_family
    from models.teacher import Teacher

    info = rank_info()
    family = get_family(cfg.model.family)
    shared = cfg.teacher.placement == "shared"
    if not shared and remote_teacher is None:
        raise ValueError("teacher.placement: separate needs a remote teacher client (TeacherServer handles)")
    teacher = Teacher(family, cfg, None) if shared else remote_teacher
    weights_dir = teacher_weights_dir(cfg)

    def build_trunk() -> torch.nn.Module:
        if weights_dir is None:
            return family.load_network(cfg)  # tiny, seeded: the same values on every rank
        cls = family.pretrained_class(cfg)  # the family's checks (DiT refuses epsilon checkpoints) come first
        return cls.from_config(cls.load_config(str(weights_dir)))

    def finish(trunk: torch.nn.Module) -> torch.nn.Module:
        return family.build_student(cfg, teacher=teacher if shared else None, network=trunk)

    torch.manual_seed(cfg.run.seed)  # modules built here (LoRA A, ...) start identical on every rank
    weights = safetensors_source(weights_dir) if weights_dir is not None else {}
    student = build_partitioned_student(cfg, build_trunk, weights, family.output_modules, finish) \
        if weights_dir is not None else _build_without_file(cfg, build_trunk, family, finish)
    if cfg.model.init_student:  # continue distilling an exported or imported student (before ZeRO wraps it)
        from trainer.engine import load_partitioned
        from trainer.export.import_released import init_student_tensors

        load_partitioned(student, init_student_tensors(cfg, student), strict=False)
    device = device_for(info)
    if cfg.train.engine != "deepspeed":
        student.to(device)  # DeepSpeed places the module itself (zero.Init + initialize on the accelerator)
    engine = build_engine(cfg, student)
    ds = cfg.train.engine == "deepspeed"
    ema = PowerEMA(engine.params, gamma=cfg.ema.gamma, start=cfg.ema.start, master=engine.local_master if ds else None,
                   refresh=engine.refresh_gathered if ds else None)
    return RankSetup(info, family, student, teacher, engine, ema, module_device(student))


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's weights (under ZeRO-3 a partitioned parameter's placeholder is on it too)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def cond_to(cond: Any, device: torch.device, dtype: Optional[torch.dtype] = None) -> Any:
    """Conditioning moved to `device`: a dict of tensors keeps its dtypes; prompt embeddings as stored
    (`data_pipeline.compact.EmbeddingBatch`: fp8 + scale, bf16, ragged) cross as they are and are dequantised,
    cast to `dtype` and padded there (None: float32 for packed embeddings, as the reader gave before)."""
    if cond is None:
        return None
    if isinstance(cond, EmbeddingBatch):
        return cond.to(device, dtype)
    return {k: v.to(device) for k, v in cond.items()}


def compute_dtype(cfg: Config) -> torch.dtype:
    """The dtype prompt embeddings are converted to on the rank's device: the networks' (`model.dtype`)."""
    return torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32


class OnDevice:
    """Batches (noise, cond[, DataSegments]) moved to the student's device as they are consumed; noise is drawn on the CPU
    from per-sample generators (the same numbers on any device), so the move happens here, once per step.
    Prompt embeddings arrive in their stored dtype and become `cond_dtype` on the device (issue 22).
    Forwards `state_dict` / `load_state_dict` / `metrics` / `consumed` to the wrapped iterator."""

    def __init__(self, batches: Iterator[tuple[torch.Tensor, Any]], device: torch.device,
                 cond_dtype: Optional[torch.dtype] = None):
        self.batches, self.device, self.cond_dtype = batches, device, cond_dtype

    def __iter__(self) -> "OnDevice":
        return self

    def __next__(self) -> tuple:
        noise, cond, *data = next(self.batches)  # data-based pi-ID adds the samples' DataSegments
        moved = (noise.to(self.device, torch.float32), cond_to(cond, self.device, self.cond_dtype))
        if data:
            (seg,) = data
            moved += (DataSegments(seg.x0.to(self.device), seg.tau_src, seg.segment),)
        return moved

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["batches"], name)


def _build_without_file(cfg: Config, build_trunk, family, finish) -> torch.nn.Module:
    """Tiny teachers have no weights file: every rank builds the same seeded trunk partitioned (zero.Init),
    keeps the constructed values, and the output modules are gathered as in `build_partitioned_student`."""
    return build_partitioned_student(cfg, build_trunk, None, family.output_modules, finish)


def iteration_for(cfg: Config):
    """The loop's iteration: overlapped when the teacher is remote and `teacher.overlap` is on."""
    if cfg.teacher.placement == "separate" and cfg.teacher.overlap:
        from trainer.overlap import overlapped_iteration

        return overlapped_iteration
    return None  # the loop's sequential data_free_iteration


class PromptBatches:
    """(noise (B_rank,C,H,W), cond) per step from a rank's `PromptBatch` iterator (a `FeedIterator` over the
    launcher's data feed, or a `RankBatches`), with the stream's cursor as `state_dict()`.

    cond is the batch's prompt embeddings (encoded on the data workers, sliced for this rank), still in their
    stored dtype (`EmbeddingBatch`; `OnDevice` converts them on the device). The noise of a
    sample is drawn from its own generator seeded by (run.seed, global sample index), the index being
    batch number x global batch + position in the global batch: the same sample gets the same noise with
    any number of ranks and any layout. `consumed` lists the keys of every batch handed out.

    Data-based (`distill.data_free: false`, PIFLOW.md §3.1) a third item, `DataSegments`, carries the batch's
    data latents (the `latent` member of latent shards) and each sample's segment, drawn like the noise from
    a generator keyed by (run.seed, global sample index)."""

    def __init__(self, cfg: Config, source: Iterator[Any], info: RankInfo, latent_shape: tuple[int, ...]):
        self.source, self.info = source, info
        self.seed, self.batch_size, self.layout = cfg.run.seed, cfg.train.batch_size, cfg.data.layout
        self.data_free, self.nfe, self.final_step_scale = (cfg.distill.data_free, cfg.distill.nfe,
                                                           cfg.distill.final_step_scale)
        self.latent_shape = tuple(latent_shape)
        self.consumed: list[list[str]] = []
        self._cursor: Optional[dict[str, Any]] = None
        self._wait_s = 0.0  # how long this step waited for its batch (the feed, the fetch of its embeddings)
        self._telemetry: dict[str, float] = {}

    def __iter__(self) -> "PromptBatches":
        return self

    def global_positions(self) -> list[int]:
        return global_positions(self.batch_size, self.info.rank, self.info.world_size, self.layout)

    def __next__(self) -> tuple[torch.Tensor, Any]:
        import time

        t0 = time.perf_counter()
        batch = next(self.source)
        self._wait_s = time.perf_counter() - t0
        self._telemetry = dict(getattr(batch, "telemetry", None) or {})
        if batch.embeddings is None:
            raise ValueError(f"prompt batch (keys {batch.keys[:3]}...) carries no embeddings: the data feed needs "
                             "an encoder (the launcher passes models.families.load_text_encoder) or "
                             "data.pre_encoded shards")
        positions = self.global_positions()
        if len(positions) != len(batch.keys):
            raise ValueError(f"rank {self.info.rank} got {len(batch.keys)} prompts, expected {len(positions)} "
                             f"(train.batch_size {self.batch_size} over {self.info.world_size} ranks)")
        first = (int(batch.cursor["batches"]) - 1) * self.batch_size  # global index of the batch's sample 0
        noise = torch.stack([sample_noise(self.seed, first + p, self.latent_shape) for p in positions])
        self.consumed.append(list(batch.keys))
        self._cursor = batch.cursor
        emb = batch.embeddings
        latents = emb[LATENT_KEY].float() if LATENT_KEY in emb else None  # (B_rank, C, H, W) or None
        cond = emb.without(LATENT_KEY) if isinstance(emb, EmbeddingBatch) else \
            {k: v for k, v in emb.items() if k != LATENT_KEY}
        if self.data_free:
            return noise, cond or None  # (B_rank, C, H, W), {name: (B_rank, ...)}
        if latents is None:
            raise ValueError(f"distill.data_free: false but the prompt batch (keys {batch.keys[:3]}...) has no "
                             f"'{LATENT_KEY}' member: data.shards must be latent shards (`piflow shards latents`)")
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"latent shard samples (keys {batch.keys[:3]}...) hold latents of shape "
                             f"{tuple(latents.shape[1:])}, the config's model wants {self.latent_shape}")
        segs = [sample_segment_of(self.seed, first + p, self.nfe, self.final_step_scale) for p in positions]
        tau_src, segment = (torch.tensor(v, dtype=torch.float64) for v in zip(*segs))
        return noise, cond or None, DataSegments(latents.float(), tau_src, segment)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)

    def metrics(self) -> dict[str, float]:
        """The stream's cumulative counters (samples, bad records by reason, skipped shards) at the last batch,
        this step's wait for its batch (`data/wait_s`) and the readers' memory and queue depth when it was cut."""
        from data_pipeline.records import DataStats

        if self._cursor is None:
            return {}
        stats = DataStats()
        stats.load_state_dict(self._cursor["stats"])
        return {**stats.metrics(), "data/wait_s": self._wait_s, **self._telemetry}


def sample_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The source noise of global sample `index`: its own generator, seeded by a hash of (seed, index). (torch's
    CPU generator keeps only the low 32 bits of a seed: `seed * 2^32 + index` made run.seed a no-op.)"""
    g = torch.Generator().manual_seed(sample_key(seed, index, "noise"))
    return torch.randn(shape, generator=g)


class _RankLogger:
    """Wraps the metrics logger for a rank: the loss keys are averaged over ranks (an all_reduce every rank
    joins) before rank 0 logs them (rank 0's own loss stays as `loss_rank0`), the data counters are added,
    and each step's consumed sample keys go to the rank's `KeyLog`."""

    def __init__(self, logger, world_size: int, keys: Optional["KeyLog"] = None,
                 data: Optional[PromptBatches] = None):
        self.logger, self.world_size, self.keys, self.data = logger, world_size, keys, data

    def log(self, step: int, values: dict[str, Any]) -> None:
        if self.keys is not None:
            self.keys.log(step, self.data.consumed[-1])
        if self.data is not None:
            values = {**values, **self.data.metrics()}  # bad records are counted in the metrics, never silent
        if self.world_size > 1:
            import torch.distributed as dist

            names = sorted(k for k in values if k == "loss" or k.startswith(("loss/", "mse/")))
            from trainer.distributed import collective_device

            t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=collective_device())
            dist.all_reduce(t)
            values = {**values, "loss_rank0": values["loss"], **dict(zip(names, (t / self.world_size).tolist()))}
        self.logger.log(step, values)


class KeyLog:
    """`<output>/data_keys/rank_R.jsonl`: the sample keys each step consumed on this rank (an audit that a
    resume neither replays nor skips data). A local file or segments on object storage (trainer/record_log.py);
    the records after the resumed step are dropped on open, like metrics.jsonl."""

    def __init__(self, cfg: Config, output: str | Path, rank: int, resume_step: int, guard=None):
        from data_pipeline import storage
        from trainer.record_log import RecordLog

        self.path = storage.join(str(output), "data_keys", f"rank_{rank}.jsonl")
        self._log = RecordLog(self.path, resume_step=resume_step, flush_steps=cfg.run.log_flush_steps,
                              flush_s=cfg.run.log_flush_s, guard=guard)

    def log(self, step: int, keys: list[str]) -> None:
        self._log.append({"step": step, "keys": keys})

    def flush(self) -> None:
        self._log.flush()

    def close(self) -> None:
        self._log.close()


def _validation_encoder(cfg: Config):
    """Prompts -> cond for the validation rollouts (None for families without prompts)."""
    if cfg.model.family in ("toy2d",):
        return None
    from models.families import load_text_encoder
    from trainer.weights import with_local_weights

    return load_text_encoder(with_local_weights(cfg))


def run_rank(cfg: Config, remote_teacher: Any = None, *, prompt_batches: Optional[Callable[[RankInfo], Any]] = None,
             cond_shapes: Optional[dict[str, list[int]]] = None, output_dir: Optional[str] = None,
             progress: bool = False, guard: Optional[Callable[[], None]] = None,
             validation: Any = None) -> dict[str, Any]:
    """Train to `cfg.train.iters` on this rank, resuming from the newest valid checkpoint under run.output.

    Batches: `prompt_batches(info)` returns this rank's `PromptBatch` iterator with `state_dict` /
    `load_state_dict` (cluster/ builds it over the data feed; the trainer never sees ray); without it
    (`data.shards` empty) data-free batches with random conditioning of `cond_shapes`. Every rank writes its
    checkpoint part; rank 0 logs metrics (loss averaged over ranks), rollouts and the manifest. `guard()`
    (the single-writer lease's check, trainer/checkpoint/lease.py) runs before every write of logs and checkpoints.
    `validation` (cluster/validation.py's `RemoteValidation`: `encode(prompts)`, `decode(x0)`) serves the
    validation prompts' conditioning, encoded once on the teacher group, and decodes rank 0's rollouts with the
    VAE there; without it this rank encodes the prompts itself and previews show latent channels.
    Returns this rank's summary."""
    import time

    import torch.distributed as dist

    from trainer.checkpoint import resume
    from trainer.loop import train_loop
    from trainer.evaluation.rollouts import RolloutHook
    from trainer.metrics import FirstStepClock, MetricsLogger, PhaseTimes

    t_init = time.perf_counter()
    setup = build_rank(cfg, remote_teacher)
    info = setup.info
    # startup timing (issue 7): rank 0 prints each phase as it ends; every rank reports its own in the summary
    times = PhaseTimes(print_each=info.is_rank0)
    times.add("student_init", time.perf_counter() - t_init)
    barrier = dist.barrier if dist.is_available() and dist.is_initialized() else None

    # The launcher decided fresh vs resume (and applied --force) once for the run; a group that Ray Train
    # restarts lands here again and must resume from the newest valid checkpoint, not re-decide.
    ckpt_info = resume.prepare_output(cfg, info.rank, barrier, decided=True)
    manager = resume.make_manager(cfg, info.rank, info.world_size, barrier, any_rank=setup.engine.any_rank)
    # pi-ID draws its random numbers per sample, keyed by (run.seed, global sample index) like the noise
    # (models/sample_rng.py): a W-rank run is the same computation as a 1-rank one, and a resume on another
    # number of ranks continues it. No per-rank generator is left to checkpoint.
    generators: dict[str, torch.Generator] = {}
    positions = global_positions(cfg.train.batch_size, info.rank, info.world_size, cfg.data.layout)

    def sample_rng(it: int) -> SampleRNG:
        return SampleRNG(cfg.run.seed, [it * cfg.train.batch_size + p for p in positions])

    ok = False
    logger = keys = eval_hook = None
    try:
        # built before the RNGs are restored, so whatever its construction draws cannot shift a resumed run
        encode = None
        if cfg.eval.every:
            encode = validation.encode if validation is not None else _validation_encoder(cfg)
        state = resume.resume_state(cfg, manager, ckpt_info, setup.engine, setup.ema, setup.student, generators)
        start = state.step if state else 0
        if prompt_batches is not None:
            batches: Any = PromptBatches(cfg, prompt_batches(info), info, setup.family.latent_shape(cfg))
            if state is not None:
                batches.load_state_dict(state.data_state)  # the cursor of the batches consumed up to `start`
        else:
            if cond_shapes is None:
                raise ValueError("run_rank: without prompt batches (data.shards) give cond_shapes")
            batches = synthetic_batches(cfg, info, cond_shapes, start_step=start)
        out = str(output_dir or cfg.run.output)  # local dir or s3:// (issue 11)
        logger = MetricsLogger(cfg, out, rank=info.rank, run_id=(state.wandb_run_id or None) if state else None,
                               resume_step=start, guard=guard)
        keys = KeyLog(cfg, out, info.rank, start, guard=guard) if prompt_batches is not None else None
        clock = FirstStepClock(OnDevice(batches, setup.device, compute_dtype(cfg)), times)

        def checkpoint_hook(step: int, loss: Optional[float] = None) -> float:
            # the cursor just past the batches CONSUMED so far (the rank reads no batch ahead of the loop)
            data = batches.state_dict() if prompt_batches is not None else {"synthetic_step": step}
            if guard is not None:
                guard()  # a run whose lease was taken over stops before it writes a checkpoint
            logger.flush()  # the logs on storage cover every step up to the checkpoint, before it commits
            if keys is not None:
                keys.flush()
            return resume.save_state(cfg, manager, step, setup.engine, setup.ema, setup.student,
                                     data_state=data, generators=generators,
                                     wandb_run_id=logger.wandb_run_id or "", loss=loss)

        eval_hook = None
        if cfg.eval.every:  # every rank samples (ZeRO-3 forwards are collective); rank 0 writes
            eval_hook = RolloutHook(cfg, setup.family, setup.student, rank=info.rank, logger=logger, encode=encode,
                                    decode=validation.decode if validation is not None else None,
                                    device=setup.device)
        encode = None  # the validation prompts are encoded once: the encoders need not stay in memory
        log = _RankLogger(logger, info.world_size, keys, batches if prompt_batches is not None else None)
        teacher = with_injected_faults(setup.teacher)  # the teacher itself unless a soak injects NaN
        steps = train_loop(cfg, setup.engine, setup.student.make_policy, teacher, clock, ema=setup.ema,
                           logger=log, eval_hook=eval_hook, checkpoint_hook=checkpoint_hook, start_step=start,
                           progress=progress, iteration=iteration_for(cfg), sample_rng=sample_rng)
        clock.finish()
        ok = True
    finally:
        if eval_hook is not None:
            eval_hook.close()  # queued rollout uploads (issue 12: asynchronous, never fatal)
        if logger is not None:
            logger.close()
        if keys is not None:
            keys.close()
        if not ok:
            manager.barrier = None  # a failing rank must not wait in a collective for ranks that carry on
        manager.close()  # uploads finished (and, on success, every rank synced) before the process exits
    local = sum(p.ds_tensor.numel() for p in setup.engine.params if hasattr(p, "ds_tensor"))
    full = sum(getattr(p, "ds_numel", p.numel()) for p in setup.engine.params)
    summary = {"rank": info.rank, "steps": steps, "start_step": start, "local_numel": local, "full_numel": full,
               "metrics_path": str(logger.path), "startup": times.seconds,
               "checkpoint_steps": list(manager.completed_steps),
               "resumed_from": state.checkpoint_url if state else "", "dtypes": precision_report(setup)}
    if prompt_batches is not None:
        summary["data"] = batches.state_dict()
    if hasattr(setup.engine, "memory_report"):  # what `piflow plan` predicts, measured on this rank's tensors
        summary["memory_bytes"] = {**setup.engine.memory_report(),
                                   "ema": sum(s.numel() * s.element_size() for s in setup.ema.shadow)}
    return summary


def precision_report(setup: RankSetup) -> dict[str, list[str]]:
    """The dtypes a run trains with (sorted, distinct): trainable weights, their optimiser master copies
    (ZeRO-3: this rank's fp32 partitions) and the EMA shadow."""
    engine = setup.engine
    master = [engine.local_master(p) for p in engine.params] if hasattr(engine, "local_master") else engine.params
    names = lambda ts: sorted({str(t.dtype).replace("torch.", "") for t in ts if t is not None})  # noqa: E731
    return {"params": names(engine.params), "master": names(master), "ema": names(setup.ema.shadow)}


def synthetic_batches(cfg: Config, info: RankInfo, cond_shapes: dict[str, list[int]], start_step: int = 0
                      ) -> Iterator[tuple[torch.Tensor, Any]]:
    """Data-free batches without prompt shards: per step, the global batch's noise and random conditioning
    (shapes per sample in `cond_shapes`, e.g. {"prompt_embeds": [T, D]}) from generators seeded by
    (run.seed, step), sliced for this rank by `data.layout` (the same samples whatever the world size).
    `*_mask` keys are all ones (every random token is valid); `class_labels` (class-conditional families) are
    drawn uniformly over `model.num_classes` from each sample's own generator, keyed by its global index
    (`sample_class_label`). A resume starts at `start_step` (the batches are a function of the step alone)."""
    from models.families import get_family

    shape = get_family(cfg.model.family).latent_shape(cfg)
    n = cfg.train.batch_size
    if n % info.world_size:
        raise ValueError(f"train.batch_size {n} does not split over {info.world_size} ranks")
    idx = torch.tensor(global_positions(n, info.rank, info.world_size, cfg.data.layout))
    step = start_step
    while True:
        g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step)
        noise = torch.randn((n, *shape), generator=g)  # (B_global, C, H, W)
        cond = {}
        for k, s in cond_shapes.items():
            if k == "class_labels":  # (B_rank,) int64
                cond[k] = torch.tensor([sample_class_label(cfg.run.seed, step * n + int(i), cfg.model.num_classes)
                                        for i in idx], dtype=torch.long)
            elif k.endswith("_mask"):
                cond[k] = torch.ones((len(idx), *s), dtype=torch.long)
            else:
                cond[k] = torch.randn((n, *s), generator=g)[idx]
        yield noise[idx], cond or None
        step += 1


def sample_class_label(seed: int, index: int, num_classes: int) -> int:
    """The class of data-free global sample `index`: uniform over [0, num_classes), from the sample's own
    generator (a stream apart from its noise's), so it does not depend on the world size or layout."""
    g = torch.Generator().manual_seed(sample_key(seed, index, "class"))
    return int(torch.randint(num_classes, (1,), generator=g))
