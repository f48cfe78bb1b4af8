"""``deltadist import``, ``export`` and ``merge``: a delta from another library's format into
deltadist's, a deltadist delta into PEFT's, and a delta merged into its backbone's checkpoint.

``deltadist import --from opendelta SOURCE OUT --model MODEL`` converts a checkpoint OpenDelta wrote
(``config.json`` + ``pytorch_model.bin``, read without running code; see
:mod:`deltadist.integrations.opendelta`); ``--from peft`` reads a PEFT LoRA adapter. ``deltadist
export --delta DELTA --format peft --out DIR --model MODEL`` writes PEFT's adapter files. Each
loads the backbone checkpoint (the class its ``config.json`` names) to attach the delta to and
check every key against; the written delta carries the backbone's fingerprint. ``deltadist merge
--model MODEL --delta DELTA --out DIR [--dtype bf16]`` writes MODEL with the delta folded into its
weights, one site at a time (:mod:`deltadist.integrations.merge_checkpoint`): a plain transformers
checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from deltadist.errors import DeltaError

SOURCES = ("opendelta", "peft")
FORMATS = ("peft", "deltadist")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
HEAD_NAME = "head.safetensors"
"""Beside the adapter of a submodule (the built-in job's encoder): the run's tensors outside it."""


def add_parsers(commands: Any) -> None:
    """Add the ``import`` and ``export`` subcommands to ``commands`` (an ``add_subparsers()`` result)."""
    importing = commands.add_parser(
        "import", help="convert a delta OpenDelta or PEFT wrote into deltadist's format",
        description="Convert a delta checkpoint from another library into deltadist's format (safetensors "
                    "with the backbone's fingerprint). OpenDelta's pickled weights are read with "
                    "torch.load(weights_only=True): no code runs.")
    importing.add_argument("--from", dest="source_format", choices=SOURCES, required=True,
                           help="the library that wrote SOURCE")
    importing.add_argument("source", metavar="SOURCE", help="the checkpoint directory it wrote")
    importing.add_argument("out", metavar="OUT", help="the directory to write the deltadist delta to")
    importing.add_argument("--model", required=True, metavar="MODEL",
                           help="the backbone's transformers checkpoint directory (every key is checked "
                                "against it)")
    exporting = commands.add_parser(
        "export", help="write a deltadist delta in PEFT's format",
        description="Write a saved deltadist delta as PEFT's LoRA adapter (adapter_config.json + "
                    "adapter_model.safetensors), which peft.PeftModel.from_pretrained loads.")
    exporting.add_argument("--run", metavar="DIR", help="a deltadist train output_dir (its model and delta)")
    exporting.add_argument("--delta", metavar="DELTA", help="the delta directory (with --model)")
    exporting.add_argument("--format", choices=FORMATS, default="peft",
                           help="the format to write (default peft)")
    exporting.add_argument("--out", required=True, metavar="DIR", help="the directory to write")
    exporting.add_argument("--model", metavar="MODEL",
                           help="the backbone's transformers checkpoint directory (with --delta)")
    merging = commands.add_parser(
        "merge", help="write a checkpoint with a delta merged into its weights (plain transformers)",
        description="Fold a saved delta into its backbone's weights and write a transformers checkpoint "
                    "(config.json, sharded safetensors, the tokenizer) that from_pretrained loads without "
                    "deltadist. The backbone is read one site at a time: it never has to fit in memory.")
    merging.add_argument("--run", metavar="DIR", help="a deltadist train output_dir (its model and delta)")
    merging.add_argument("--model", metavar="MODEL",
                         help="the backbone's checkpoint directory (with --delta)")
    merging.add_argument("--delta", metavar="DELTA", help="the delta directory (with --model)")
    merging.add_argument("--out", required=True, metavar="DIR",
                         help="the new checkpoint's directory (new or empty)")
    merging.add_argument("--dtype", choices=DTYPES, help="the written weights' dtype (default: as stored)")
    merging.add_argument("--max-shard-size", type=int, default=2048, metavar="MB",
                         help="largest output shard in MiB (default 2048)")
    merging.add_argument("--no-check-hash", dest="check_hash", action="store_false",
                         help="merge even if the checkpoint is not the one the delta was trained on "
                              "(its fingerprint, read from a few values of each tensor, differs)")


def run(args: argparse.Namespace) -> int:
    """``deltadist import`` / ``export``: 0 when written, 2 on bad input (one ``error:`` line)."""
    from deltadist.cli.main import _fail, _os_problem, fail_missing_extra

    try:
        written, summary = {"import": _import, "export": _export, "merge": _merge}[args.command](args)
    except DeltaError as err:
        return _fail(args.command, str(err))
    except OSError as err:
        return _fail(args.command, f"{_os_problem(err)}; check the paths (--model must be a transformers "
                                   "checkpoint directory).")
    except ImportError as err:
        return fail_missing_extra(args.command, err, "transformers")
    print(f"{written}: {summary}")
    return 0


def _import(args: argparse.Namespace) -> tuple[str, str]:
    from deltadist.api.auto import AutoDeltaModel
    from deltadist.cli.models import load_model
    from deltadist.integrations.opendelta import import_opendelta

    backbone = load_model(args.model)
    if args.source_format == "opendelta":
        delta = import_opendelta(args.source, backbone)
    else:
        delta = AutoDeltaModel.from_finetuned(args.source, backbone_model=backbone)
    written = delta.save_finetuned(args.out, backbone_checkpoint_name=str(Path(args.model)))
    return written, f"{_described(delta)}, converted from {args.source_format}'s {args.source}"


def _export(args: argparse.Namespace) -> tuple[str, str]:
    from deltadist.api.auto import AutoDeltaModel
    from deltadist.errors import ConfigError

    if (args.run is None) == (args.model is None) or (args.model is None) != (args.delta is None):
        raise ConfigError("give --run DIR, or --model MODEL with --delta DELTA.")
    if args.run is None:
        from deltadist.cli.models import load_model

        backbone, delta_dir, name, within = load_model(args.model), args.delta, str(Path(args.model)), ""
    else:
        backbone, delta_dir, name, within = _run_model(args.run)
    if within:
        return _export_within(backbone, within, Path(delta_dir), args, name)
    delta = AutoDeltaModel.from_finetuned(delta_dir, backbone_model=backbone)
    written = delta.save_finetuned(args.out, format=args.format, backbone_checkpoint_name=name)
    return written, f"{_described(delta)} in {args.format}'s format"


def _run_model(run_dir: str) -> tuple[Any, str, str, str]:
    """A run's model as its job built it (its class and head), its delta directory, its checkpoint,
    and the submodule that checkpoint is of where the model is no transformers class (``""``: none)."""
    import torch

    from deltadist.training.config import load_config
    from deltadist.training.model import load_model, resolve_model_path
    from deltadist.training.prediction import run_files

    config, delta_dir = run_files(run_dir)
    cfg = load_config(config)
    model = load_model(cfg.model, cfg.task, cfg.data.labels, 0, torch.float32, show_progress=False).model
    return model, str(delta_dir), resolve_model_path(cfg.model.name_or_path), _within(model)


def _within(model: Any) -> str:
    """``""`` for a transformers model; else the child that is one (the built-in job's ``encoder``)."""
    if hasattr(model, "config"):
        return ""
    return next(name for name, child in model.named_children() if hasattr(child, "config"))


def _export_within(model: Any, within: str, delta_dir: Path, args: argparse.Namespace,
                   name: str) -> tuple[str, str]:
    """The delta's part inside ``within`` as an adapter of that transformers model, and its tensors
    outside it (the built-in job's classifier) beside, in ``head.safetensors``."""
    from safetensors.torch import save_file

    from deltadist.api.auto import AutoDeltaModel
    from deltadist.io import checkpoint

    saved, start = checkpoint.read_tensors(delta_dir), f"{within}."
    backbone_keys = ("backbone_class", "backbone_checkpoint_name", "backbone_hash", "backbone_samples")
    settings = {k: v for k, v in checkpoint.read_config(delta_dir).items() if k not in backbone_keys}
    settings["unfrozen_modules"] = ["deltas"]  # what lies outside the encoder goes beside it
    delta = AutoDeltaModel.from_config(settings, backbone_model=model.get_submodule(within))
    delta.load_state_dict({k.removeprefix(start): v for k, v in saved.items() if k.startswith(start)},
                          where=f"{delta_dir} ({within})")
    written = delta.save_finetuned(args.out, format=args.format, backbone_checkpoint_name=name)
    head = {k: v.contiguous() for k, v in saved.items() if not k.startswith(start)}
    if head:
        save_file(head, str(Path(written) / HEAD_NAME))
    return written, (f"{_described(delta)} of the {within} in {args.format}'s format, and "
                     f"{', '.join(sorted(head)) or 'nothing'} in {HEAD_NAME}")


def _merge(args: argparse.Namespace) -> tuple[str, str]:
    import torch

    from deltadist.errors import ConfigError
    from deltadist.integrations.merge_checkpoint import merge_checkpoint

    if (args.run is None) == (args.model is None) or (args.model is None) != (args.delta is None):
        raise ConfigError("give --run DIR, or --model MODEL with --delta DELTA.")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    model, model_dir, delta_dir, within = _merge_inputs(args)
    report = merge_checkpoint(model, model_dir, delta_dir, args.out, dtype,
                              max_shard_bytes=args.max_shard_size * 1024 ** 2, within=within,
                              check_hash=args.check_hash)
    what = f"the {within} of " if within else ""
    return str(report.directory), (f"{what}{model_dir} with the delta merged into {report.sites} sites: "
                                   f"{report.tensors:,} tensors in {report.shards} shard(s)")


def _merge_inputs(args: argparse.Namespace) -> tuple[Any, str, str, str]:
    """The model on meta, its checkpoint, the delta, and the submodule the checkpoint is of (``""``:
    the model; the built-in job's classifier is no transformers class: its ``encoder``)."""
    if args.run is None:
        from deltadist.cli.models import meta_model

        return meta_model(args.model), args.model, args.delta, ""
    import torch

    from deltadist.training.config import load_config
    from deltadist.training.model import plan_model, resolve_model_path
    from deltadist.training.prediction import run_files

    config, delta_dir = run_files(args.run)
    cfg = load_config(config)
    model = plan_model(cfg.model, cfg.task, cfg.data.labels, torch.float32).model
    return model, resolve_model_path(cfg.model.name_or_path), str(delta_dir), _within(model)


def _described(delta: Any) -> str:
    count = sum(p.numel() for p in delta.parameters())
    return f"a {delta.delta_type} delta on {len(delta.sites)} sites, {count:,} parameters"
