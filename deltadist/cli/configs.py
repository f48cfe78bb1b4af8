"""``deltadist configs [NAME] [--out PATH]``: list, print or copy the example configs that ship inside
the package.

``deltadist/configs`` is a link to the checkout's top-level ``configs/`` (one copy in git); a wheel
holds the files themselves. Both are read through ``importlib.resources``, so a wheel, an editable
install and a checkout on ``PYTHONPATH`` list the same examples.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from deltadist.training.config_files import INCLUDE_KEY

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``configs`` subcommand to ``commands`` (an ``add_subparsers()`` result)."""
    configs = commands.add_parser(
        "configs", help="list, print or copy the example configs that ship with deltadist",
        description="Without NAME: one line per example config (jobs for deltadist train, DeepSpeed "
                    "and accelerate files). With NAME: print it, or with --out copy it.",
    )
    configs.add_argument("name", nargs="?", metavar="NAME",
                         help="an example's name as listed (the suffix may be left out: minilm_lora_ddp)")
    configs.add_argument("--out", metavar="PATH",
                         help="write NAME to PATH instead of printing it (never overwrites), with the "
                              "examples it includes beside it")
    return configs


def shipped_configs() -> dict[str, Traversable]:
    """The example configs by name (``minilm_lora.yaml``, ``deepspeed/zero3.json``): the jobs first,
    then each folder's files."""
    root = resources.files("deltadist") / "configs"
    found = {entry.name: entry for entry in sorted(root.iterdir(), key=lambda e: e.name) if entry.is_file()}
    for folder in sorted((e for e in root.iterdir() if e.is_dir()), key=lambda e: e.name):
        found.update({f"{folder.name}/{entry.name}": entry
                      for entry in sorted(folder.iterdir(), key=lambda e: e.name) if entry.is_file()})
    return found


def run(args: argparse.Namespace) -> int:
    """List, print or copy; 0 ok, 2 on an unknown NAME or a PATH that exists."""
    from deltadist.cli.main import _fail  # not at the top: main imports this module

    examples = shipped_configs()
    if args.name is None:
        if args.out is not None:
            return _fail("configs", "--out needs the NAME of the example to copy; "
                                    "`deltadist configs` lists them.", ranked=False)
        width = max(map(len, examples))
        for name, entry in examples.items():
            print(f"{name:<{width}}  {summary(entry.read_text(encoding='utf-8'))}")
        return 0
    name = _find(args.name, examples)
    if name is None:
        return _fail("configs", f"no example config named {args.name!r}; `deltadist configs` lists them "
                                "(e.g. minilm_lora_ddp, deepspeed/zero3).", ranked=False)
    if args.out is None:
        sys.stdout.write(examples[name].read_text(encoding="utf-8"))
        return 0
    try:
        written = _copy(name, examples, Path(args.out))
    except FileExistsError as err:
        if Path(err.filename) != Path(args.out):
            return _fail("configs", f"{err.filename} exists and is not the example {name} includes; remove "
                                    "it or pick another folder for --out.", ranked=False)
        return _fail("configs", f"{err.filename} exists; remove it or pick another --out.", ranked=False)
    except OSError as err:
        return _fail("configs", f"cannot write {err.filename}: {err.strerror}; pick another --out.",
                     ranked=False)
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0


def summary(text: str) -> str:
    """A config's first line of description: its first comment line that is not a ``Launch:`` command
    (YAML) or the first sentence of its ``_comment`` (JSON)."""
    if text.lstrip().startswith("{"):
        comment = json.loads(text).get("_comment", "")
        return comment.split(". ", 1)[0].rstrip(".") + "." if comment else ""
    for line in text.splitlines():
        described = line.lstrip("#").strip()
        if line.startswith("#") and described and not described.startswith("Launch:"):
            return described
    return ""


def _find(name: str, examples: dict[str, Traversable]) -> str | None:
    """The example ``name`` names: itself, or one whose name is ``name`` plus its suffix."""
    if name in examples:
        return name
    return next((known for known in examples if known.rpartition(".")[0] == name), None)


def _copy(name: str, examples: dict[str, Traversable], out: Path) -> list[Path]:
    """Write example ``name`` to ``out`` and the examples it includes (by their own names) beside it;
    return the paths written. ``out`` must not exist; an include that exists must hold the same text.
    Nothing is written unless everything can be."""
    texts = {out: examples[name].read_text(encoding="utf-8")}
    folder = name.rpartition("/")[0]
    base = _include(texts[out])
    while base is not None:  # the shipped examples include only shipped ones, without cycles
        text = examples[f"{folder}/{base}" if folder else base].read_text(encoding="utf-8")
        texts[out.parent / base] = text
        base = _include(text)
    for path, text in texts.items():
        if path.exists() and (path == out or path.read_text(encoding="utf-8") != text):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
    written = [path for path in texts if not path.exists()]
    for path in written:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x", encoding="utf-8") as file:
            file.write(texts[path])
    return written


def _include(text: str) -> str | None:
    """The file a YAML config's ``include:`` names, if it has one."""
    if text.lstrip().startswith("{"):
        return None
    raw = yaml.safe_load(text)
    return raw.get(INCLUDE_KEY) if isinstance(raw, dict) else None
