"""``deltadist inspect MODEL [--delta-config PATH] [--set KEY=VALUE ...]``: a checkpoint's module tree,
and with a delta config the sites it would touch and the trainable counts -- built on the meta
device from ``config.json`` alone, so no weight is read and a 70B checkpoint shows in seconds.

``--delta-config`` takes a YAML or JSON file holding a delta config (``delta_type``,
``modified_modules``, ...) or a ``deltadist train`` config (its ``delta:`` section is used);
``--set`` overrides one of its keys (``--set lora_r=16``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from deltadist.errors import ConfigError, DeltaError


def add_parser(commands: Any) -> None:
    """Add the ``inspect`` subcommand to ``commands`` (an ``add_subparsers()`` result)."""
    parser = commands.add_parser(
        "inspect", help="show a checkpoint's modules and what a delta config would modify (no weights read)",
        description="Print a transformers checkpoint's module tree (built on the meta device from its "
                    "config.json: no weight is read); with --delta-config, the delta attached on meta: its "
                    "sites marked in the tree, and trainable / total parameter counts.")
    parser.add_argument("model_path", metavar="MODEL",
                        help="transformers checkpoint directory (config.json)")
    parser.add_argument("--delta-config", metavar="PATH",
                        help="YAML/JSON with a delta config, or a deltadist train config (its delta: "
                             "section)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the delta config, e.g. --set lora_r=16 (repeatable)")
    parser.add_argument("--params", action="store_true",
                        help="list every parameter with its shape in the tree")


def run(args: argparse.Namespace) -> int:
    """Print the tree (and the delta's sites and counts); 0 ok, 2 on bad input."""
    from deltadist.cli.main import _fail, _os_problem, fail_missing_extra
    from deltadist.cli.models import meta_model

    try:
        settings = _delta_settings(args.delta_config, args.overrides) if args.delta_config or args.overrides \
            else None
        model = meta_model(args.model_path)
        _show(model, settings, args.params)
    except DeltaError as err:
        return _fail(args.command, str(err))
    except OSError as err:
        return _fail(args.command, f"{_os_problem(err)}; MODEL must be a transformers checkpoint directory "
                                   "(with config.json) and --delta-config a readable file.")
    except ImportError as err:
        return fail_missing_extra(args.command, err, "transformers")
    return 0


def _show(model: Any, settings: dict[str, Any] | None, params: bool) -> None:
    from deltadist.api.auto import AutoDeltaConfig, AutoDeltaModel
    from deltadist.interactive.visualize import Visualization

    if settings is None:
        Visualization(model).structure_graph(expand_params=params)
        total = sum(p.numel() for p in model.parameters())
        print(f"{type(model).__name__}: {total:,} parameters (on meta: no weight was read)")
        return
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(settings), backbone_model=model)
    delta.freeze_module()
    delta.log()
    print(f"{delta.delta_type} on {len(delta.sites)} sites of {type(model).__name__} "
          "(on meta: no weight was read)")


def _delta_settings(path: str | None, overrides: list[str]) -> dict[str, Any]:
    """The delta config in ``path`` (or empty), with ``KEY=VALUE`` overrides (values read as YAML)."""
    raw: Any = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            problem = " ".join(str(err).split())
            raise ConfigError(f"--delta-config {path}: invalid YAML/JSON ({problem}).") from err
        if isinstance(raw, dict) and isinstance(raw.get("delta"), dict):
            raw = raw["delta"]
        if not isinstance(raw, dict):
            raise ConfigError(f"--delta-config {path}: expected a mapping of delta config keys (or a train "
                              f"config with a delta: section), got {type(raw).__name__}.")
    settings = dict(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set needs KEY=VALUE (e.g. lora_r=16), got {item!r}.")
        settings[key.strip()] = yaml.safe_load(text) if text.strip() else ""
    settings.setdefault("delta_type", "lora")
    return settings
