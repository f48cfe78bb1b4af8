"""``deltadist predict (--run DIR | --model M --delta D) --input ROWS [--output FILE]``: a trained
delta's predictions on rows, as JSON Lines (each input row with its ``prediction``; classification
adds its ``score``), a batch at a time with a progress bar on stderr.

``--run`` reads what ``deltadist train`` wrote there (``config.yaml``: the model, task, class names,
chat template; ``delta/``); ``--model``/``--delta`` take a transformers checkpoint (the task from its
class, the class names from its ``id2label``) and a delta directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(commands: Any) -> None:
    """Add the ``predict`` subcommand to ``commands`` (an ``add_subparsers()`` result)."""
    parser = commands.add_parser(
        "predict", help="run a trained delta on rows: class names or generated text, as JSON Lines",
        description="Predict with a trained delta: each input row (JSON Lines, JSON, CSV, Parquet) with its "
                    "prediction, as JSON Lines on stdout (or --output).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="DIR", help="a deltadist train output_dir (config.yaml and delta/)")
    source.add_argument("--model", metavar="MODEL", help="a transformers checkpoint directory (with --delta)")
    parser.add_argument("--delta", metavar="DELTA", help="the delta directory, with --model")
    parser.add_argument("--input", required=True, metavar="ROWS",
                        help="rows: text (classification), prompt or text, or chat turns (language models)")
    parser.add_argument("--output", metavar="FILE", help="write the JSON Lines here (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation: at most this many tokens")
    parser.add_argument("--do-sample", action="store_true", help="generation: sample (default: greedy)")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --do-sample (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --do-sample (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="with --do-sample: the sampling seed (default 0)")


def run(args: argparse.Namespace) -> int:
    """Write the predictions; 0 ok, 2 on bad input (one ``error:`` line)."""
    from deltadist.cli.main import _fail, _os_problem, fail_missing_extra
    from deltadist.errors import DeltaError

    if (args.model is None) != (args.delta is None):
        return _fail(args.command, "--model and --delta go together (or give --run DIR).")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        return _fail(args.command, "--batch-size and --max-new-tokens must be positive.")
    try:
        return _predict(args)
    except DeltaError as err:
        return _fail(args.command, str(err))
    except OSError as err:
        return _fail(args.command, f"{_os_problem(err)}; check --run / --model / --delta / --input.")
    except ImportError as err:
        return fail_missing_extra(args.command, err, "train")


def _predict(args: argparse.Namespace) -> int:
    import torch

    from deltadist.training.config import ModelConfig, load_config
    from deltadist.training.data_files import load_split
    from deltadist.training.prediction import load_predictor, predict, run_files, run_labels, task_of

    if args.run is not None:
        config_path, delta_dir = run_files(args.run)
        cfg = load_config(config_path)
        predictor = load_predictor(cfg.model, cfg.task, cfg.data.labels, delta_dir, cfg.data.chat_template)
    else:
        from deltadist.cli.models import checkpoint_config

        config = checkpoint_config(args.model)
        task = task_of(config)
        predictor = load_predictor(ModelConfig(name_or_path=args.model, max_length=512), task,
                                   run_labels(task, config), args.delta)
    rows = load_split(args.input, "--input")
    sampling = None
    if args.do_sample:
        torch.manual_seed(args.seed)
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for row in predict(predictor, rows, args.input, args.batch_size, args.max_new_tokens, sampling):
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
