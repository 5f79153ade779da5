"""Sub-commands of `piflow` beyond `train`. Each `_add_*` function registers one command group;
handlers import their heavy dependencies lazily."""
from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    for add in (_add_teacher, _add_demo, _add_toy_demo, _add_shards, _add_plan, _add_export, _add_sample, _add_submit,
                _add_template, _add_convert, _add_import):
        add(sub)
    from cluster.jobs.eval import add_eval
    from cluster.rehearse import add_rehearse

    add_eval(sub)
    add_rehearse(sub)


def need_input(url: str, what: str) -> None:
    """A one-line error before any work when an input path is missing or empty (issue 12)."""
    from data_pipeline import storage

    if not storage.exists(url):
        raise FileNotFoundError(f"{what} {url} does not exist")
    if not storage.is_s3(url) and __import__("os").path.isdir(url) and not storage.listdir(url):
        raise FileNotFoundError(f"{what} {url} is an empty directory")


def _add_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teacher", help="train the project's own small teachers (toy2d, digits) and cache them")
    p.add_argument("config", help="YAML config whose model.family names the teacher")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--force", action="store_true", help="retrain even if a cached teacher exists")

    def run(args: argparse.Namespace) -> int:
        from trainer.config import load_config
        from trainer.teachers.build import ensure_teacher

        cfg = load_config(args.config, args.overrides)
        path = ensure_teacher(cfg, force=args.force)
        print(f"teacher ready: {path}")
        return 0

    p.set_defaults(func=run)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the embedded default end to end: digits teacher -> 4-step GM student through "
                                    "Ray, ZeRO-3, a TeacherServer and DataWorkers; a table and PNG grids")
    p.add_argument("--config", default=None, help="default: configs/digits_demo.yaml of this checkout")
    p.add_argument("--students", default="data-free",
                   help="students to train now (comma-separated: data-free, data-based); `make demo-data` "
                        "trains the data-based one and shows it beside the data-free student of an earlier "
                        "`make demo`")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    def run(args: argparse.Namespace) -> int:
        from cluster.demo import run_demo

        students = tuple(s.strip() for s in args.students.split(",") if s.strip())
        if not students or set(students) - {"data-free", "data-based"}:
            raise SystemExit(f"piflow demo: --students takes data-free and/or data-based, got {args.students!r}")
        report = run_demo(args.config, args.overrides, students=students)
        return 0 if all(report["bars"].values()) else 1

    p.set_defaults(func=run)


def _add_toy_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("toy-demo", help="the 2-D toy end to end: teacher + 4-NFE GM student, a table and a scatter PNG")
    p.add_argument("--config", default=None, help="toy config (default: configs/toy2d.yaml of this checkout)")
    p.add_argument("--output", default="runs/toy_demo", help="where the table, JSON, PNG and metrics go")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default); the toy's ops are "
                   "tiny, and extra threads spin against each other on a shared machine")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        import torch

        from trainer.config import load_config
        from trainer.evaluation.toy2d import run_demo

        config = args.config or str(Path(__file__).resolve().parents[1] / "configs" / "toy2d.yaml")
        # Shorter than the benchmark: fits 10 minutes on 2 cores including the teacher's training.
        demo = ["train.iters=800", "eval.every=0", f"run.output={args.output}", "run.force=true"]
        cfg = load_config(config, [*demo, *args.overrides])
        if args.threads:
            torch.set_num_threads(args.threads)
        run_demo(cfg, Path(args.output), samples=4096, seeds=3, floor_pairs=3)
        return 0

    p.set_defaults(func=run)


def _add_shards(sub: argparse._SubParsersAction) -> None:
    """`piflow shards build|inspect|encode`: prompt shards (webdataset tars) in a local dir or on s3://."""
    p = sub.add_parser("shards", help="build, inspect or pre-encode prompt shards (local dir or s3://)")
    ss = p.add_subparsers(dest="shards_command", metavar="ACTION", required=True)

    b = ss.add_parser("build", help="write webdataset prompt shards from .txt/.jsonl/.csv/.parquet")
    b.add_argument("input", help="prompt file: .txt (one per line), .jsonl, .csv or .parquet (local or s3://)")
    b.add_argument("--out", required=True, help="output dir or s3://bucket/prefix (must hold no shards yet)")
    b.add_argument("--column", default="prompt", help="prompt column/key for .jsonl/.csv/.parquet")
    b.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    b.add_argument("--normalize", action="store_true", help="Unicode NFC and collapse whitespace")
    b.add_argument("--dedup", action="store_true", help="drop exact duplicates (after --normalize)")

    def build(args: argparse.Namespace) -> int:
        from data_pipeline.shards import build_shards

        rep = build_shards(args.input, args.out, column=args.column, per_shard=args.per_shard,
                           normalize=args.normalize, dedup=args.dedup)
        print(f"wrote {rep.samples} prompts in {len(rep.urls)} shards to {args.out} "
              f"(dropped {rep.empty} empty, {rep.duplicates} duplicates, {len(rep.bad_rows)} bad rows)")
        return 0

    b.set_defaults(func=build)

    i = ss.add_parser("inspect", help="count shards and samples, show a few, list every bad record")
    i.add_argument("url", help="shard dir/prefix, one .tar, a brace pattern or a comma-separated list")
    i.add_argument("--samples", type=int, default=3, help="examples to show")
    i.add_argument("--max-prompt-chars", type=int, default=2000)

    def inspect_(args: argparse.Namespace) -> int:
        from data_pipeline.reader import ReadOptions
        from data_pipeline.shards import format_inspect, inspect

        if "{" not in args.url and "," not in args.url:
            need_input(args.url, "shards")
        rep = inspect(args.url, args.samples, ReadOptions(max_prompt_chars=args.max_prompt_chars), progress=True)
        print(format_inspect(rep))
        return 1 if rep.unreadable or rep.bad else 0

    i.set_defaults(func=inspect_)


    from cluster.jobs.cli import add_encode, add_latents

    add_encode(ss)
    add_latents(ss)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="memory, placement and time plan of a config on a cluster, without allocating")
    p.add_argument("config", help="YAML config (model.family flux, qwen_image or dit)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--cluster", default="", help="NODESxGPUSxKIND, KIND one of H100, H200, A100 (e.g. 2x8xH100); "
                                                  "default: the recipe's cluster.nodes x cluster.gpus_per_node, H100")
    p.add_argument("--gpus", type=int, default=0, help="memory plan only: total GPUs (student + teacher group)")
    p.add_argument("--gpu-mem", type=float, default=0.0, help="memory plan only: memory per GPU in GiB")
    p.add_argument("--mfu", type=float, default=None, help="assumed model-FLOPs utilisation for the time plan "
                                                          "(default 0.40: issue 23's target, not a measurement)")

    def run(args: argparse.Namespace) -> int:
        from trainer.config import ConfigError, load_config
        from trainer.planner.memory import format_plan, make_plan

        cfg = load_config(args.config, args.overrides)
        if args.gpus or args.gpu_mem:  # the memory plan on a GPU count (no node shape, no time plan)
            if not (args.gpus and args.gpu_mem):
                raise ConfigError("piflow plan: --gpus and --gpu-mem go together (or use --cluster)")
            print(format_plan(make_plan(cfg, args.gpus, args.gpu_mem), cfg))
            return 0
        from trainer.planner.time_plan import DEFAULT_MFU, format_time_plan, make_time_plan, parse_cluster

        cluster = parse_cluster(args.cluster, cfg)
        print(format_plan(make_plan(cfg, cluster.gpus, cluster.gpu_mem_gib, cluster.gpus_per_node), cfg))
        print()
        mfu = DEFAULT_MFU if args.mfu is None else args.mfu
        print(format_time_plan(make_time_plan(cfg, cluster, mfu), cfg))
        return 0

    p.set_defaults(func=run)


# ---- export and sample (issue 6: trainer/export/pipeline.py, models/pipeline.py)
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint's EMA student as a diffusers-format directory")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="a run.output (its newest valid checkpoint) or one checkpoints/step_N dir; local or s3://")
    p.add_argument("--out", required=True, help="the directory to write, local or s3:// (diffusers.DiffusionPipeline"
                   ".from_pretrained(DIR, trust_remote_code=True) loads it; so does piflow sample)")
    p.add_argument("--self-contained", action="store_true", help="copy a hub base model's text encoders and VAE "
                   "into the export instead of referencing them by id")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="upload the export to this Hub model repo "
                   "(token from the HF chain: HF_TOKEN or `huggingface-cli login`)")

    def run(args: argparse.Namespace) -> int:
        from trainer.export.pipeline import export_student, export_summary

        need_input(args.source, "RUN_OR_CHECKPOINT")
        export_student(args.source, args.out, self_contained=args.self_contained)
        meta = export_summary(args.out)
        print(f"exported {meta['kind']} {meta['family']} student (base {meta['base_model']}) to {args.out}")
        if args.push_to_hub:
            from trainer.weights import push_to_hub

            print(f"pushed to {push_to_hub(args.out, args.push_to_hub)}")
        return 0

    p.set_defaults(func=run)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate with an exported student (or a run / checkpoint, exported first)")
    p.add_argument("source", metavar="DIR_OR_RUN", help="an export dir, a run.output or a checkpoint dir")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several; none for toy2d)")
    p.add_argument("--nfe", type=int, default=0, help="student evaluations (0 = the distilled NFE)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--num", type=int, default=1, help="images per prompt")
    p.add_argument("--out", required=True, help="PNG grid to write (latents beside it as .pt); video families "
                   "write an animated image: .gif, .webp or .png (APNG)")
    p.add_argument("--device", default="auto", help="auto (the first GPU if any, else the CPU), cpu, cuda or cuda:N: "
                   "where the student, its text encoders and the VAE run")

    def run(args: argparse.Namespace) -> int:
        import os
        import tempfile

        import torch

        from models.pipeline import PiFlowPipeline, inference_device

        from data_pipeline import storage

        try:
            device = inference_device(args.device)
        except ValueError as e:
            raise SystemExit(f"piflow sample: {e}") from None
        need_input(args.source, "DIR_OR_RUN")
        with tempfile.TemporaryDirectory(prefix="piflow-sample-") as tmp:
            source = args.source
            if not storage.exists(storage.join(source, "model_index.json")):
                from trainer.export.pipeline import export_student

                export_student(source, tmp)  # a run or checkpoint, local or s3://
                source = tmp
            elif storage.is_s3(source):  # an export on object storage: copied here to load
                storage.download_dir(source, tmp)
                source = tmp
            pipe = PiFlowPipeline.from_pretrained(source).to(device)
        batch = max(len(args.prompt), 1) * args.num
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(batch)]
        latents = pipe(prompt=args.prompt or None, num_inference_steps=args.nfe or None, generator=generators,
                       num_images=args.num, output_type="latent")
        from trainer.evaluation.rollouts import animation, preview_png

        images = None
        if pipe.vae() is not None:  # decoded on the device too
            images = pipe.family.decode(pipe.vae(), latents, cfg=pipe.student.cfg).clamp(-1, 1).cpu()
        elif not pipe.family.uses_vae:  # the latents are the images (digits)
            images = pipe.family.decode(None, latents, cfg=pipe.student.cfg).cpu()
        latents = latents.cpu()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        if images is not None and images.dim() == 5:  # decoded clips (B, 3, F, H, W)
            ext = os.path.splitext(args.out)[1].lower()
            fmt = {".gif": "GIF", ".webp": "WEBP", ".png": "PNG"}.get(ext)
            if fmt is None:
                raise SystemExit(f"piflow sample: --out {args.out}: a video family writes .gif, .webp or .png")
            data = animation(images, fmt)
        else:
            data = preview_png(latents, images)
        with open(args.out, "wb") as f:
            f.write(data)
        torch.save(latents, os.path.splitext(args.out)[0] + ".pt")
        print(f"wrote {args.out} ({batch} samples, {args.nfe or pipe.student.cfg.distill.nfe} NFE, on {device})")
        return 0

    p.set_defaults(func=run)


# ---- cluster submission (issue 7: cluster/submit.py, cluster/templates.py)
def _add_submit(sub: argparse._SubParsersAction) -> None:
    """`piflow submit|status|stop`: runs on a Ray cluster through the Jobs API (token from RAY_AUTH_TOKEN...)."""
    p = sub.add_parser("submit", help="submit a run to a Ray cluster (Jobs API): packages the working dir, "
                                      "streams the logs, prints the job id")
    p.add_argument("config", help="YAML config inside the working dir (validated here before uploading)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--address", default=None, help="dashboard URL http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--working-dir", default=".", help="directory uploaded with the job (default: the current one)")
    p.add_argument("--exclude", action="append", default=[], help="extra gitignore-style upload exclude (repeat)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="non-secret environment variable for the job (repeat); credentials are refused")
    p.add_argument("--job-id", default="", help="submission id (default: <run.name>-<UTC time>-<hex>)")
    p.add_argument("--force", action="store_true", help="start fresh even if run.output holds checkpoints")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following the logs")

    def run(args: argparse.Namespace) -> int:
        from cluster.submit import SubmitError, SubmitRequest, stream_logs, submit

        env = {}
        for item in args.env:
            if "=" not in item:
                print(f"piflow submit: --env {item!r}: expected KEY=VALUE", file=sys.stderr)
                return 2
            key, value = item.split("=", 1)
            env[key] = value
        req = SubmitRequest(config=args.config, overrides=list(args.overrides), working_dir=args.working_dir,
                            excludes=list(args.exclude), env=env, job_id=args.job_id, force=args.force)
        try:
            job_id = submit(req, args.address)
            if args.no_wait:
                print(job_id)
                return 0
            print(f"piflow: submitted job {job_id}", flush=True)
            try:
                status = stream_logs(args.address, job_id)
            except KeyboardInterrupt:
                print(f"\npiflow: stopped following; job {job_id} keeps running "
                      f"(piflow status {job_id} / piflow stop {job_id})", file=sys.stderr)
                return 130
        except SubmitError as e:
            print(f"piflow submit: {e}", file=sys.stderr)
            return 2
        print(f"piflow: job {job_id} {status}")
        return 0 if status == "SUCCEEDED" else 1

    p.set_defaults(func=run)

    s = sub.add_parser("status", help="status of a submitted job (or the list of jobs)")
    s.add_argument("job", nargs="?", default=None, help="job id (omit to list the cluster's jobs)")
    s.add_argument("--address", default=None, help="dashboard URL http://HEAD:8265")
    s.add_argument("--logs", action="store_true", help="also print the job's logs so far")

    def status(args: argparse.Namespace) -> int:
        from cluster.submit import SubmitError, format_info, job_info, list_jobs, make_client

        try:
            if args.job is None:
                for j in list_jobs(args.address):
                    print(f"{j['job_id']}  {j['status']:<10} {j['run_name']}")
                return 0
            print(format_info(job_info(args.address, args.job)))
            if args.logs:
                print(make_client(args.address).get_job_logs(args.job), end="")
        except SubmitError as e:
            print(f"piflow status: {e}", file=sys.stderr)
            return 2
        return 0

    s.set_defaults(func=status)

    t = sub.add_parser("stop", help="stop a submitted job and wait until it has stopped")
    t.add_argument("job", help="job id")
    t.add_argument("--address", default=None, help="dashboard URL http://HEAD:8265")
    t.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the job to end")

    def stop_(args: argparse.Namespace) -> int:
        from cluster.submit import TERMINAL, SubmitError, stop

        try:
            final = stop(args.address, args.job, args.timeout)
        except SubmitError as e:
            print(f"piflow stop: {e}", file=sys.stderr)
            return 2
        print(f"piflow: job {args.job} {final}")
        return 0 if final in TERMINAL else 1

    t.set_defaults(func=stop_)


def _add_template(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("template", help="render the SLURM sbatch script or the KubeRay RayJob manifest for a config")
    p.add_argument("kind", choices=["slurm", "kuberay"])
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (baked into the rendered file)")
    # the node shape: the recipe's cluster.nodes / gpus_per_node / cpus_per_node / memory_gb_per_node unless given
    p.add_argument("--nodes", type=int, default=None, help="nodes (SLURM) / pods: 1 head + nodes-1 workers "
                   "(default: cluster.nodes, else 1)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: cluster.gpus_per_node, else what "
                   "the run's GPUs need over the nodes")
    p.add_argument("--cpus-per-node", type=int, default=None, help="default: cluster.cpus_per_node, else the "
                   "fewest on which the run's ranks, replicas and workers pack")
    p.add_argument("--mem-per-node", default=None, help="memory per node, e.g. 512G (default: "
                   "cluster.memory_gb_per_node; SLURM: else all of the node's)")
    p.add_argument("--time", default="24:00:00", help="SLURM wall-clock limit")
    p.add_argument("--partition", default="", help="SLURM partition ('' = the cluster's default)")
    p.add_argument("--account", default="", help="SLURM account ('' = none)")
    p.add_argument("--venv", default="", help="SLURM: virtualenv to activate on every node ('' = none)")
    p.add_argument("--workdir", default="", help="SLURM: the checkout on the shared filesystem (default: cwd)")
    p.add_argument("--image", default="", help="KubeRay (required): an image built from this repository's "
                   "Dockerfile, e.g. REGISTRY/piflow:TAG")
    p.add_argument("--namespace", default="default", help="KubeRay namespace")
    p.add_argument("--secret", default="piflow-credentials", help="KubeRay: the Secret whose keys (HF_TOKEN, "
                   "WANDB_API_KEY, AWS_*) become every pod's environment")
    p.add_argument("--scratch-gb", type=int, default=None, help="KubeRay: scratch volume per pod (default: sized "
                   "from the plan: teacher snapshot + checkpoint staging)")
    p.add_argument("--storage-class", default="", help="KubeRay: storage class of the scratch volume")
    p.add_argument("--gcs-port", type=int, default=6379, help="SLURM: the Ray head's GCS port")
    p.add_argument("--dashboard-port", type=int, default=8265, help="SLURM: the Ray dashboard (Jobs API) port")

    def run(args: argparse.Namespace) -> int:
        from cluster.job_templates import TemplateError, TemplateParams, render

        params = TemplateParams(config=args.config, overrides=list(args.overrides), nodes=args.nodes,
                                gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node,
                                mem_per_node=args.mem_per_node, time=args.time, partition=args.partition,
                                account=args.account, venv=args.venv, workdir=args.workdir, image=args.image,
                                namespace=args.namespace, secret=args.secret, scratch_gb=args.scratch_gb,
                                storage_class=args.storage_class, gcs_port=args.gcs_port,
                                dashboard_port=args.dashboard_port)
        try:
            text = render(args.kind, params)
        except TemplateError as e:
            print(f"piflow template: {e}", file=sys.stderr)
            return 2
        sys.stdout.write(text)
        return 0

    p.set_defaults(func=run)


# ---- converters (issue 15: models/converters/)
def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert another project's checkpoint into a diffusers-format dir")
    p.add_argument("kind", choices=["dit-fm"], help="dit-fm: the reference flow-matching DiT (ImageNet teacher)")
    p.add_argument("checkpoint", help="the .pth/.pt (loaded without pickle) or .safetensors file")
    p.add_argument("--out", required=True, help="the directory to write (model.pretrained of a dit config)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (default: 16 for DiT-XL/L widths, "
                   "else width / 64)")
    p.add_argument("--sample-size", type=int, default=None, help="latent size the position table is built for "
                   "(default: from the checkpoint's table, else 32)")
    p.add_argument("--force", action="store_true", help="overwrite an existing conversion in --out")

    def run(args: argparse.Namespace) -> int:
        import os
        import sys

        from models.converters.dit_fm import ConvertError, convert_dit_fm

        if os.path.exists(os.path.join(args.out, "transformer")) and not args.force:
            print(f"piflow convert: {args.out}/transformer exists (a previous conversion); pass --force to "
                  f"overwrite", file=sys.stderr)
            return 2
        try:
            out = convert_dit_fm(args.checkpoint, args.out, args.num_heads, args.sample_size)
        except ConvertError as e:
            print(f"piflow convert: {e}", file=sys.stderr)
            return 2
        print(f"converted {args.checkpoint} -> {out} (model.family: dit, model.pretrained: {out})")
        return 0

    p.set_defaults(func=run)


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="a released pi-Flow student (pi-FLUX.1 / pi-Qwen-Image adapter, ImageNet "
                                      "GM-DiT) as an export dir: piflow sample DIR")
    p.add_argument("kind", choices=["pi-flux", "pi-qwen", "gm-dit"])
    p.add_argument("source", help="the adapter dir (e.g. a download of Lakonik/pi-FLUX.1/gmflux_k8_piid_4step) or "
                   "a .safetensors/.pth file (loaded without pickle)")
    p.add_argument("--config", required=True, help="the recipe the student belongs to (base model, distill settings)")
    p.add_argument("--out", required=True, help="the export dir to write")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")

    def run(args: argparse.Namespace) -> int:
        import sys

        from models.converters.dit_fm import ConvertError
        from models.converters.released import ReleasedLayoutError
        from trainer.config import load_config
        from trainer.export.import_released import import_released

        cfg = load_config(args.config, args.overrides)
        try:
            import_released(args.kind, args.source, cfg, args.out)
        except (ConvertError, ReleasedLayoutError) as e:
            print(f"piflow import: {e}", file=sys.stderr)
            return 2
        print(f"imported {args.kind} {args.source} -> {args.out} (piflow sample {args.out} --prompt ...)")
        return 0

    p.set_defaults(func=run)
