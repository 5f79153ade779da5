"""`piflow eval RUN_OR_EXPORT --prompts FILE_OR_URL --nfe 4 [--teacher-steps 50]` as a Ray job.

Generation is spread over an actor pool (one actor per GPU when the cluster has GPUs, else `--workers` CPU
actors), each loading the exported student and its teacher once (trainer/evaluation/generate.py); the teacher's
latents are cached under OUT/../cache by (prompt, seed, steps), so a rerun, or another student of the same
teacher, only generates the student. The driver decodes, scores (trainer/evaluation/report.py) and writes
RUN/eval/<name>/ (results.json, table.md, grids/), logging through trainer/metrics.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional


class EvalActor:
    """One generator: the student, its teacher and their text encoders on `device` ("auto": this actor's GPU when
    Ray gave it one, i.e. CUDA_VISIBLE_DEVICES names it, else the CPU)."""

    def __init__(self, export_dir: str, cache_dir: str, device: str = "auto"):
        import torch

        from models.pipeline import inference_device
        from trainer.evaluation.generate import Generator

        torch.set_num_threads(1)
        self.device = inference_device(device)
        self.gen = Generator(export_dir, cache_dir, device=self.device)

    def where(self) -> str:
        return str(self.device)

    def run(self, kind: str, steps: int, prompts: list[str], seeds: list[int]) -> tuple[Any, int]:
        if kind == "student":
            return self.gen.student(prompts, seeds, steps), len(prompts)
        return self.gen.teacher(prompts, seeds, steps)


def read_prompts(spec: str) -> list[str]:
    """Prompts from a .txt/.jsonl/.csv/.parquet file (local or s3://) or from prompt shards."""
    from data_pipeline.shards import INPUT_KINDS, inspect, read_rows

    if any(spec.lower().endswith(ext) for ext in INPUT_KINDS):
        prompts = [p.strip() for p, _ in read_rows(spec) if p and p.strip()]
    else:
        rep = inspect(spec, num_examples=10 ** 9)
        prompts = [r.txt for r in rep.examples]
    if not prompts:
        raise ValueError(f"--prompts {spec}: no prompts")
    return prompts


def resolve_export(source: str, out_root: Path) -> str:
    """An export dir as is; a run or checkpoint is exported (EMA) to out_root/export first."""
    if (Path(source) / "model_index.json").exists():
        return source
    from trainer.export.pipeline import export_student

    export_dir = out_root / "export"
    export_student(source, export_dir)
    return str(export_dir)


def load_reference(spec: str, image_size: int = 0):
    """--reference: image shards (png/jpg/npy, like `shards latents` reads) -> (N, C, H, W) in [0, 1], or an
    .npz with mu and sigma (reference feature statistics) -> (mu, sigma)."""
    import numpy as np
    import torch

    if spec.endswith(".npz"):
        with np.load(spec, allow_pickle=False) as d:
            return None, (d["mu"], d["sigma"])
    from data_pipeline.latents.shards import decode_image
    from data_pipeline.reader import fetch_samples
    from data_pipeline.shards import resolve_shards

    images = []
    for url in resolve_shards(spec):
        samples, _ = fetch_samples(url, 3, 0.5)
        images += [torch.from_numpy(decode_image(m, image_size)) for _, m in samples]
    return (torch.stack(images) + 1) / 2, None


def run_eval(source: str, prompts_spec: str, nfe: int, teacher_steps: int, seeds: int = 4, name: str = "",
             reference: str = "", clip: str = "", classifier: str = "", workers: int = 0, address: str = "local",
             out: str = "", prompts: Optional[list[str]] = None, in_process: bool = False, cache_dir: str = "",
             extra: Optional[dict] = None, log: bool = True) -> dict:
    """`in_process`: generate in this process (the periodic evaluation is itself a Ray task: no actors of its
    own); `prompts` instead of `prompts_spec`; `cache_dir` for the teacher's latents (default OUT/../cache);
    `extra` joins results.json; `log=False` leaves metrics logging to the caller."""
    import ray
    import torch

    from trainer.config import config_from_dict
    from trainer.evaluation.features import feature_net
    from trainer.evaluation.report import score, write_outputs

    name = name or f"nfe{nfe}_teacher{teacher_steps}"
    root = Path(source)
    out_dir = Path(out) if out else root / "eval" / name
    export_dir = resolve_export(source, out_dir)
    piflow = json.loads((Path(export_dir) / "student" / "config.json").read_text())["piflow"]
    cfg = config_from_dict(piflow, source=f"{export_dir}/student/config.json")
    prompts = prompts or read_prompts(prompts_spec)
    rows_p = [p for p in prompts for _ in range(seeds)]
    rows_s = [s for _ in prompts for s in range(seeds)]
    groups = [i for i in range(len(prompts)) for _ in range(seeds)]

    cache = cache_dir or str(out_dir.parent / "cache" / "teacher")
    methods = [(f"teacher {teacher_steps}-step", "teacher", teacher_steps),
               (f"teacher {nfe}-step (Euler)", "teacher", nfe), (f"student {nfe}-step", "student", nfe)]
    latents, generated = {}, {}
    if in_process:
        local = EvalActor(export_dir, cache)
        for label, kind, steps in methods:
            latents[label], generated[label] = local.run(kind, steps, rows_p, rows_s)
    own = not in_process and not ray.is_initialized()
    if own:
        ray.init(address=address, include_dashboard=False, log_to_driver=False) if address == "local" \
            else ray.init(address=address)
    try:
        if not in_process:
            latents, generated = _generate_on_actors(export_dir, cache, methods, rows_p, rows_s, workers)
    finally:
        if own:
            ray.shutdown()
    for label in latents:
        print(f"{label}: {generated[label]} of {len(rows_p)} generated ({len(rows_p) - generated[label]} "
              "from the cache)", file=sys.stderr)

    from trainer.evaluation.generate import Generator

    gen = Generator(export_dir)  # decoding (VAE) in the driver
    images = {k: gen.images(v) for k, v in latents.items()}
    ref_images, ref_stats = load_reference(reference) if reference else (None, None)
    net = feature_net(cfg.model.family, clip=clip, classifier=classifier)
    rows = score(net, images, rows_p, groups, f"teacher {teacher_steps}-step", ref_images, ref_stats)
    info = {"source": source, "export": export_dir, "prompts": len(prompts), "seeds": seeds, "nfe": nfe,
            "teacher_steps": teacher_steps, "generated": generated, "reference": reference, **(extra or {})}
    return write_outputs(out_dir, rows, images, prompts, groups, info, cfg if log else None)


def _generate_on_actors(export_dir: str, cache: str, methods: list, rows_p: list[str], rows_s: list[int],
                        workers: int) -> tuple[dict, dict]:
    """Each method's latents, rows split over an actor pool (one actor per GPU, else `workers` CPU actors)."""
    import ray
    import torch

    gpus = int(ray.cluster_resources().get("GPU", 0))
    n = max(1, gpus or workers or 1)
    actor_cls = ray.remote(num_cpus=1 if not gpus else 0, num_gpus=1 if gpus else 0)(EvalActor)
    # an actor given a GPU generates on it (Ray sets its CUDA_VISIBLE_DEVICES); CPU actors stay on the CPU
    actors = [actor_cls.remote(export_dir, cache, "cuda" if gpus else "cpu") for _ in range(n)]
    chunks = [list(range(i, len(rows_p), n)) for i in range(n)]
    latents, generated = {}, {}
    for label, kind, steps in methods:
        refs = [a.run.remote(kind, steps, [rows_p[i] for i in c], [rows_s[i] for i in c])
                for a, c in zip(actors, chunks) if c]
        parts = ray.get(refs)
        x = torch.empty(len(rows_p), *parts[0][0].shape[1:])
        for c, (xi, _) in zip([c for c in chunks if c], parts):
            x[c] = xi
        latents[label], generated[label] = x, sum(k for _, k in parts)
    return latents, generated


def full_eval_url(run_output: str, step: int) -> str:
    from data_pipeline import storage

    return storage.join(run_output, "eval", f"step_{step:07d}")


def eval_checkpoint(cfg_dict: dict, ckpt_url: str, step: int) -> dict:
    """One periodic evaluation (`eval.full_every`; a Ray task started by cluster/full_eval.py): the checkpoint's
    EMA student exported to node-local scratch, `piflow eval` in this process with the eval.full_* settings,
    results (results.json, table.md, grids/) in RUN/eval/step_XXXXXXX/, uploaded when run.output is object
    storage. The teacher's latents are cached in scratch: later checkpoints only generate the student."""
    import os
    import tempfile

    import torch

    from data_pipeline import storage
    from trainer.config import config_from_dict
    from trainer.export.pipeline import export_student
    from trainer.scratch import run_scratch

    cfg = config_from_dict(cfg_dict, source="<full eval>")
    torch.set_num_threads(max(1, int(cfg.teacher.cpus_per_replica)))
    e = cfg.eval
    out_url = full_eval_url(cfg.run.output, step)
    text_to_image = cfg.model.family in ("flux", "qwen_image")
    os.makedirs(run_scratch(cfg), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="full-eval-", dir=run_scratch(cfg)) as tmp:
        export_dir = os.path.join(tmp, "export")
        export_student(ckpt_url, export_dir)
        local_out = os.path.join(tmp, "out") if storage.is_s3(out_url) else out_url
        res = run_eval(export_dir, e.full_prompts, e.nfe, e.full_teacher_steps, e.full_seeds, out=local_out,
                       prompts=None if e.full_prompts else list(e.prompts),
                       clip=e.full_features if text_to_image else "",
                       classifier="" if text_to_image else e.full_features, in_process=True,
                       cache_dir=run_scratch(cfg, "eval_cache", "teacher"),
                       extra={"source": ckpt_url, "export": "", "step": step}, log=False)
        if storage.is_s3(out_url):
            storage.upload_dir(local_out, out_url)
    return {"step": step, "rows": res["rows"], "out": out_url}


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="generate with a student and its teacher (Ray actors) and score FID, "
                                    "CLIP score / accuracy, diversity (IS, precision/recall for classifiers)")
    p.add_argument("source", metavar="RUN_OR_EXPORT", help="an export dir, a run.output or a checkpoint dir")
    p.add_argument("--prompts", required=True, help="prompt file (.txt/.jsonl/.csv/.parquet) or prompt shards")
    p.add_argument("--nfe", type=int, default=4, help="student steps (also the teacher's few-step baseline)")
    p.add_argument("--teacher-steps", type=int, default=50, help="the teacher's Euler steps (the reference)")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt (diversity is measured across them)")
    p.add_argument("--name", default="", help="results go to RUN/eval/NAME (default nfe{N}_teacher{T})")
    p.add_argument("--out", default="", help="results dir instead of RUN/eval/NAME")
    p.add_argument("--reference", default="", help="reference image shards, or an .npz with mu and sigma")
    p.add_argument("--clip", default="", help="CLIP model (hub id or dir) for text-to-image families")
    p.add_argument("--classifier", default="", help="image classifier (hub id or dir) for the dit family")
    p.add_argument("--workers", type=int, default=0, help="CPU actors without GPUs (default 1)")
    p.add_argument("--address", default="local", help="Ray address ('local' starts one in this process)")

    def run(args: argparse.Namespace) -> int:
        if args.nfe < 1 or args.teacher_steps < 1 or args.seeds < 1:
            raise SystemExit("piflow eval: --nfe, --teacher-steps and --seeds must be >= 1")
        result = run_eval(args.source, args.prompts, args.nfe, args.teacher_steps, args.seeds, args.name,
                          args.reference, args.clip, args.classifier, args.workers, args.address, args.out)
        print(result["table"])
        print(f"results: {Path(result['grids'][0]).parent.parent}")
        return 0

    p.set_defaults(func=run)
