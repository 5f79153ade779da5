"""Sub-commands of `piflow` beyond `train`. Each `_add_*` function registers one command group;
handlers import their heavy dependencies lazily."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    for add in (_add_teacher,):
        add(sub)


def _add_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teacher", help="train the project's own small teachers (toy2d, digits) and cache them")
    p.add_argument("config", help="YAML config whose model.family names the teacher")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--force", action="store_true", help="retrain even if a cached teacher exists")

    def run(args: argparse.Namespace) -> int:
        from trainer.config import load_config
        from trainer.teachers import ensure_teacher

        cfg = load_config(args.config, args.overrides)
        path = ensure_teacher(cfg, force=args.force)
        print(f"teacher ready: {path}")
        return 0

    p.set_defaults(func=run)
