"""The `piflow` command line: the top floor. Heavy imports happen inside each command."""
from __future__ import annotations

import argparse
import sys


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import load_config

    cfg = load_config(args.config, args.overrides)  # fails before any work on a bad config
    if args.force:
        cfg.run.force = True
    if args.address:
        cfg.cluster.address = args.address
    from cluster.launch import launch_training

    launch_training(cfg, config_path=args.config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="piflow",
        description="pi-Flow distillation of flow-matching teachers into few-step policy students.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train (or resume) a run from a config: piflow train CONFIG [key.sub=value ...]")
    p.add_argument("config", help="YAML config (values only; defaults live in trainer/config.py)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--force", action="store_true", help="start fresh even if run.output holds checkpoints")
    p.add_argument("--address", default=None, help="Ray cluster to join (GCS host:port or 'auto'); overrides "
                   "cluster.address, whose default 'local' starts an in-process Ray")
    p.set_defaults(func=_cmd_train)

    # Each subsystem registers its own commands (kept next to the code they drive).
    from cluster import commands

    commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `key.sub=value` overrides may also follow the options (`piflow submit CONFIG --address URL a.b=1`):
    # argparse stops filling a nargs="*" positional at the first option, so collect the rest here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from trainer.config import ConfigError
    from trainer.lease import LeaseHeld, LeaseLost

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"piflow: config error: {e}", file=sys.stderr)
        return 2
    except (LeaseHeld, LeaseLost) as e:  # issue 11: another run writes to run.output
        print(f"piflow: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
