"""``deltadist launch LAUNCHER [ARGS...]``: run one of the launcher scripts that ship inside the
package (``torchrun``, ``deepspeed``, ``bmtrain``, ``slurm``) with bash, the arguments as given.

The scripts are the checkout's ``launchers/*`` (``deltadist/launchers`` links to them; a wheel holds
the files), so ``deltadist launch torchrun --nproc 8 ...`` is ``launchers/torchrun.sh --nproc 8 ...``:
its options, its ``--dry-run`` and ``--help``, its exit status. The process becomes bash (``exec``),
so signals reach the script and its ranks as they would from a shell. ``PYTHON`` (the interpreter
the scripts start ranks with) defaults to this one, the Python that has deltadist installed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any


def launchers() -> dict[str, Path]:
    """The shipped launcher scripts by name: ``torchrun`` -> ``.../deltadist/launchers/torchrun.sh``."""
    # Files on disk: the scripts find their siblings (bmtrain.sh runs torchrun.sh) next to themselves.
    root = Path(str(resources.files("deltadist") / "launchers"))
    return {path.name.partition(".")[0]: path for path in sorted(root.iterdir()) if path.is_file()}


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``launch`` subcommand to ``commands`` (an ``add_subparsers()`` result)."""
    scripts = launchers()
    listing = "\n".join(f"  {name:<10} {path.name}" for name, path in scripts.items())
    launch = commands.add_parser(
        "launch", help="start deltadist train on several ranks or nodes with a shipped launcher",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a launcher script that ships with deltadist, with ARGS as given; "
                    "`deltadist launch LAUNCHER --help` prints its options, --dry-run prints the command "
                    "it would run.\n\n" + listing,
        epilog="e.g. deltadist launch torchrun --nproc 8 --engine fsdp2 --config job.yaml\n"
               "     deltadist launch deepspeed --nproc 2 --ds-config zero3.json --dry-run",
    )
    launch.add_argument("launcher", choices=list(scripts), metavar="LAUNCHER",
                        help=f"{', '.join(scripts)}")
    launch.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="the launcher's options, then deltadist train's (--config, --set, ...)")
    return launch


def run(args: argparse.Namespace) -> int:
    """Replace this process by ``bash SCRIPT ARGS...``; return 2 (after one error line) where bash is
    missing."""
    from deltadist.cli.main import _fail  # not at the top: main imports this module

    bash = shutil.which("bash")
    if bash is None:
        return _fail("launch", "no bash on PATH; the launchers are bash scripts: install bash.", ranked=False)
    script = launchers()[args.launcher]
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(bash, ["bash", str(script), *args.args], env)
