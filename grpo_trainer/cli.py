"""`grpo-lambda` (also `python -m grpo_trainer`): the `train` and `evaluate` commands.

Options come from the defaults, then a YAML file (`--config`), then `--key value` overrides (`--key-with-dashes`
works too). `grpo-lambda train` with no arguments runs the embedded offline default.
"""
from __future__ import annotations

import argparse
import sys

from .config import BOTH, EVAL, FIELDS, TRAIN, ConfigError, build_config

_DESCRIPTIONS = {
    TRAIN: "Train a policy with GRPO-λ (or plain GRPO with --algorithm grpo). With no arguments: the embedded "
           "offline default (a tiny Llama on the shipped arithmetic task, about 2 minutes on 2 CPU cores).",
    EVAL: "Score a checkpoint (--model_name_or_path) on held-out problems: greedy accuracy and pass@1 averaged "
          "over --eval_samples samples.",
}


def _fmt_default(v) -> str:
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo-lambda", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate}")
    for command in (TRAIN, EVAL):
        p = sub.add_parser(command, help=_DESCRIPTIONS[command], description=_DESCRIPTIONS[command],
                           usage=f"grpo-lambda {command} [--config FILE] [--OPTION VALUE ...]",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", default=None, help="YAML file of option: value (default: none).")
        groups: dict[str, argparse._ArgumentGroup] = {}
        for name, f in FIELDS.items():
            if command not in f.metadata.get("commands", BOTH):
                continue
            group = f.metadata["group"]
            if group not in groups:
                groups[group] = p.add_argument_group(f"{group} options")
            flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
            default = f.default_factory() if callable(f.default_factory) else f.default
            groups[group].add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar="VALUE",
                                       help=f"{f.metadata['help']} (default: {_fmt_default(default)})")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:  # options, then data/reward/checkpoint problems found at start-up
        cfg = build_config(args.config, overrides, command=args.command)
        if args.command == TRAIN:
            from .trainer import train as run
        else:
            from .evaluate import run_evaluate as run
        run(cfg)
    except ConfigError as e:
        print(f"grpo-lambda {args.command}: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # checkpoints are written atomically: the last complete one is intact
        hint = (" Continue from the last checkpoint with the same options and --resume latest."
                if args.command == TRAIN else "")
        print(f"grpo-lambda {args.command}: interrupted.{hint}", file=sys.stderr)
        return 130
    return 0
