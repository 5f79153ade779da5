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
        description="pi-Flow distillation of flow-matching teachers into few-step policy students. "
                    "Errors print one line; add --debug (anywhere) for the full traceback.",
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


def one_line(error: BaseException) -> str:
    """An exception as one line: its message's first line (the type name when the message is empty or
    does not say what kind of failure it is)."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(error, (KeyError, IndexError, AttributeError, TypeError, AssertionError)) or not first:
        first = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return first[:1000] + (" (more with --debug)" if len(text.splitlines()) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere on the line: full tracebacks instead of one-line errors
    argv = [a for a in argv if a != "--debug"]
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
    from trainer.checkpoint.lease import LeaseHeld, LeaseLost

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        if debug:
            raise
        print(f"piflow: config error: {one_line(e)}", file=sys.stderr)
        return 2
    except (LeaseHeld, LeaseLost) as e:  # issue 11: another run writes to run.output
        print(f"piflow: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("piflow: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # issue 12: one line per error; the traceback only with --debug
        if debug:
            raise
        print(f"piflow {args.command}: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
