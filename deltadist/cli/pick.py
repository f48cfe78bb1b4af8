"""``deltadist pick MODEL_PATH --method lora``: pick ``modified_modules`` on the picker page.

The checkpoint's model is built on the meta device from its ``config.json`` (no weights are read, so
a 70B checkpoint opens in seconds). The page is ``interactive_modify``'s; the accepted selection is
printed on stdout as the ``delta:`` section of a ``deltadist train`` config (everything else --
the URL, progress -- goes to stderr, so ``deltadist pick ... > delta.yaml`` keeps only the YAML).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

import yaml

from deltadist.cli.models import meta_model
from deltadist.errors import DeltaError
from deltadist.interactive.picker import DEFAULT_PORT, DEFAULT_TIMEOUT_S
from deltadist.interactive.server import LOCALHOST


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``pick`` subcommand to ``commands`` (an ``add_subparsers()`` result)."""
    pick = commands.add_parser(
        "pick", help="pick modified_modules for a checkpoint on a local web page",
        description="Open a local web page showing the checkpoint's module tree; select modules, submit, "
                    "and get the delta: section of a training config on stdout.",
    )
    pick.add_argument("model_path", metavar="MODEL_PATH",
                      help="transformers checkpoint directory (only its config.json is read)")
    pick.add_argument("--method", default="lora",
                      help="delta_type: lora, adapter, bitfit, ... (default: lora)")
    pick.add_argument("--port", type=int, default=DEFAULT_PORT,
                      help=f"port of the page (default {DEFAULT_PORT}; 0: any free port)")
    pick.add_argument("--host", default=LOCALHOST,
                      help=f"interface to listen on (default {LOCALHOST}: this machine only)")
    pick.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                      help=f"seconds to wait for a selection (default {DEFAULT_TIMEOUT_S:g})")
    pick.add_argument("--open", action="store_true", help="also open the page in the default browser")
    return pick


def run(args: argparse.Namespace) -> int:
    """Serve the page, print the accepted ``delta:`` section; 0 ok, 2 bad input, 130 on Ctrl-C."""
    from deltadist.api.auto import AutoDeltaModel
    from deltadist.cli.main import _fail, fail_missing_extra  # not at the top: main imports this module

    try:
        model = meta_model(args.model_path)
        with contextlib.redirect_stdout(sys.stderr):
            delta = AutoDeltaModel.from_config(
                {"delta_type": args.method}, backbone_model=model, interactive_modify=args.port,
                interactive_host=args.host, interactive_timeout=args.timeout,
                interactive_open_browser=args.open,
            )
    except DeltaError as err:
        return _fail("pick", str(err))
    except OSError as err:
        return _fail("pick", f"cannot read the checkpoint's config: {err}; MODEL_PATH must be a "
                             "transformers checkpoint directory (with config.json).")
    except ImportError as err:
        return fail_missing_extra("pick", err, "transformers")
    except KeyboardInterrupt as interrupt:
        print(f"deltadist pick: {interrupt}", file=sys.stderr)
        return 130
    section = {"delta": {"delta_type": delta.delta_type, "modified_modules": delta.config.modified_modules}}
    sys.stdout.write(yaml.safe_dump(section, sort_keys=False, default_flow_style=None, width=10_000))
    return 0
