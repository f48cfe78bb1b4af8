"""``deltadist eval --run DIR --data ROWS``: a run's metrics (those ``deltadist train`` reports, the
generation score too where the job had one) for its trained delta on other rows; a table on stdout,
and with ``--output`` the same as JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(commands: Any) -> None:
    """Add the ``eval`` subcommand to ``commands`` (an ``add_subparsers()`` result)."""
    parser = commands.add_parser(
        "eval", help="a run's metrics for its trained delta on other rows",
        description="Evaluate a deltadist train run's delta on rows (in the job's formats): loss, "
                    "perplexity or accuracy / macro-F1 / confusion matrix, and the job's generation score, "
                    "in one process.")
    parser.add_argument("--run", required=True, metavar="DIR", help="a deltadist train output_dir")
    parser.add_argument("--data", required=True, metavar="ROWS", help="the rows (the job's formats)")
    parser.add_argument("--output", metavar="FILE", help="also write the metrics as JSON here")


def run(args: argparse.Namespace) -> int:
    """Print (and write) the metrics; 0 ok, 2 on bad input (one ``error:`` line)."""
    from deltadist.cli.main import _fail, _os_problem, fail_missing_extra
    from deltadist.errors import DeltaError

    try:
        from deltadist.training.config import load_config
        from deltadist.training.loop import evaluate_run
        from deltadist.training.prediction import run_files
        from deltadist.training.report import print_evaluation

        config, delta = run_files(args.run)
        cfg = load_config(config)
        evaluation = evaluate_run(cfg, delta, args.data)
    except DeltaError as err:
        return _fail(args.command, str(err))
    except OSError as err:
        return _fail(args.command, f"{_os_problem(err)}; check --run and --data.")
    except ImportError as err:
        return fail_missing_extra(args.command, err, "train")
    print_evaluation(evaluation, cfg.data.labels, args.data)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({**evaluation.metrics(), "confusion_matrix": evaluation.confusion,
                       "class_names": cfg.data.labels if evaluation.confusion else None}, handle, indent=2)
    return 0
