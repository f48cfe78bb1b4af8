"""``deltadist`` command line: ``deltadist train [--config PATH] [--set KEY=VALUE ...]``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from deltadist.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one subcommand, ``train``)."""
    parser = argparse.ArgumentParser(prog="deltadist", description="Delta tuning with OpenDelta's API.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train", help="delta-tune a model on a built-in task",
        description="Delta-tune a pretrained encoder (default: LoRA on all-MiniLM-L6-v2, 4 topics).",
        epilog="The config's engine is plain (one process), ddp, fsdp2 or fsdp1. Start a distributed "
               "engine on N ranks with: launchers/torchrun.sh --nproc N --engine ddp|fsdp2|fsdp1 "
               "[--config PATH] [--set KEY=VALUE ...] (torchrun --standalone ... -m deltadist.cli train).",
    )
    train.add_argument("--config", metavar="PATH",
                       help="YAML config (default: the built-in configs/minilm_lora.yaml)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set training.epochs=1 (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 2 bad config or unreadable file)."""
    args = build_parser().parse_args(argv)
    from deltadist.training.config import load_config
    from deltadist.training.loop import train
    from deltadist.training.report import print_summary

    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg)
    except (ConfigError, OSError) as err:
        print(f"deltadist {args.command}{_rank_tag()}: error: {err}", file=sys.stderr)
        return 2
    if result.metrics is not None:  # only the main rank of a distributed run reports
        print_summary(result.metrics, str(result.metrics_path))
    return 0


def _rank_tag() -> str:
    """`` (rank R)`` in a process torchrun started with several ranks, else ``""``."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')})" if world.isdigit() and int(world) > 1 else ""
