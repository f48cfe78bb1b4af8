"""Resumable checkpoints of a training run: the delta, and each rank's optimizer, scheduler and RNG.

Layout of ``output_dir/checkpoints/step-00000100/``::

    delta/                           the delta after step 100 (save_finetuned: gathered, full shapes)
    rank-00000-of-00002.safetensors  one per rank: that rank's optimizer state as the engine holds
                                     it (a shard under FSDP and ZeRO), its RNG states; the header
                                     holds the rest as JSON (param groups, scheduler, loss scaler)
                                     and the SHA-256 of its tensors
    run_state.json                   step, tokens, engine, world size, the job's config and the
                                     number of metrics.jsonl rows written by then

Every rank writes into ``.step-00000100.partial``; once all have, the main rank writes
``run_state.json`` and renames the folder, so a checkpoint directory without the ``.partial`` is
complete, and a run killed at any moment leaves the previous checkpoints intact. A file damaged
later (truncated, altered) reads as :class:`DamagedCheckpoint`, and ``--resume`` takes an older
checkpoint. Files are read with JSON and safetensors only: no pickle, no code runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deltadist.errors import CheckpointError, ConfigError
from deltadist.io.checkpoint import atomic_write, fsync_directory, read_tensors, tensors_sha256

CHECKPOINTS_DIRNAME = "checkpoints"
STATE_NAME = "run_state.json"
DELTA_DIRNAME = "delta"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d{8})")
_TREE_KEY = "deltadist_run_state"
_CHECKSUM_KEY = "deltadist_run_state_sha256"
"""Header key of a rank file: the SHA-256 of its tensors (absent in files of older versions)."""
_STATE_KEYS = ("step", "tokens", "engine", "world_size", "config")


class DamagedCheckpoint(CheckpointError):
    """A file of a checkpoint is truncated or corrupt (``--resume`` falls back to an older one)."""


def step_dirname(step: int) -> str:
    """The checkpoint folder name of ``step`` (``step-00000008``: sorts by step)."""
    return f"step-{step:08d}"


def rank_filename(rank: int, world_size: int) -> str:
    """The file of one rank's optimizer and RNG state in a checkpoint."""
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The complete checkpoints under ``output_dir``, oldest first, as ``(step, directory)``."""
    root = Path(output_dir) / CHECKPOINTS_DIRNAME
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.fullmatch(child.name)
            if match and (child / STATE_NAME).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


# -- trees of tensors <-> safetensors + JSON --------------------------------------------------------

def _encode(node: Any, tensors: dict[str, torch.Tensor],
            local: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """JSON for ``node``, moving each tensor into ``tensors`` (dicts become key/value pair lists,
    so the integer keys of an optimizer's state survive)."""
    if isinstance(node, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = local(node).detach().to("cpu").contiguous()
        return {"tensor": key}
    if isinstance(node, dict):
        return {"dict": [[_encode(k, tensors, local), _encode(v, tensors, local)] for k, v in node.items()]}
    if isinstance(node, (list, tuple)):
        return {"list" if isinstance(node, list) else "tuple": [_encode(v, tensors, local) for v in node]}
    if node is None or isinstance(node, (bool, int, float, str)):
        return {"value": node}
    raise CheckpointError(f"Cannot write a {type(node).__name__} into a run checkpoint (only tensors, "
                          "numbers, strings and containers of them): the engine's state is not supported.")


def _decode(node: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    (kind, value), = node.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    if kind in ("list", "tuple"):
        items = [_decode(v, tensors) for v in value]
        return items if kind == "list" else tuple(items)
    return value


# -- saving -------------------------------------------------------------------------------------------

@dataclass
class RankState:
    """What one rank contributes to a checkpoint (and gets back on resume)."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's torch RNG states (CPU, and ``device``'s when it is a GPU)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Put back the RNG states a checkpoint saved (CPU, and CUDA on ``device``)."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def write_rank_state(directory: Path, rank: int, world_size: int, state: RankState,
                     local: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """This rank's file in the (partial) checkpoint ``directory``; ``local`` maps a sharded tensor
    to this rank's piece."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode({"optimizer": state.optimizer, "scheduler": state.scheduler, "scaler": state.scaler,
                    "rng": state.rng}, tensors, local)
    target = directory / rank_filename(rank, world_size)
    metadata = {_TREE_KEY: json.dumps(tree), _CHECKSUM_KEY: tensors_sha256(tensors)}
    atomic_write(target, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_rank_state(directory: Path, rank: int, world_size: int) -> RankState:
    """This rank's part of the checkpoint at ``directory`` (tensors on the CPU), checked against
    the checksum written with it.

    Raises:
        CheckpointError: no file for this rank (another world size wrote the checkpoint).
        DamagedCheckpoint: the file is truncated or corrupt.
    """
    path = directory / rank_filename(rank, world_size)
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {path.name}: it was written by another number of "
                              f"ranks than {world_size}; resume with the world size it was written with.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tree = json.loads(metadata[_TREE_KEY])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        parts = _decode(tree, tensors)
        state = RankState(parts["optimizer"], parts["scheduler"], parts["scaler"], parts["rng"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise DamagedCheckpoint(f"{path} is truncated or corrupt ({_short(err)})") from err
    expected = metadata.get(_CHECKSUM_KEY)
    if expected is not None and tensors_sha256(tensors) != expected:
        raise DamagedCheckpoint(f"{path} is corrupt (its tensors do not match the SHA-256 written with them)")
    return state


def check_delta(directory: Path) -> None:
    """Read a checkpoint's delta whole, checking its SHA-256.

    Raises:
        DamagedCheckpoint: it is missing, truncated or corrupt.
    """
    try:
        read_tensors(directory / DELTA_DIRNAME)
    except CheckpointError as err:
        raise DamagedCheckpoint(_short(err)) from err


def _short(err: BaseException) -> str:
    """The first line of ``err``'s message, at most 200 characters."""
    text = (str(err).splitlines() or [type(err).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."


def begin(output_dir: str | os.PathLike, step: int) -> Path:
    """The empty partial directory for the checkpoint of ``step`` (main rank; others wait)."""
    partial = partial_dir(output_dir, step)
    shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while writing it
    partial.mkdir(parents=True)
    return partial


def partial_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """Where the ranks write ``step``'s checkpoint before the main rank renames it complete."""
    return Path(output_dir) / CHECKPOINTS_DIRNAME / f".{step_dirname(step)}.partial"


def commit(partial: Path, run_state: dict[str, Any], keep_last: int | None) -> Path:
    """Write ``run_state.json`` into ``partial``, rename it to its final name, drop checkpoints
    beyond the newest ``keep_last`` (main rank, after every rank has written its part)."""
    atomic_write(partial / STATE_NAME, lambda tmp: Path(tmp).write_text(json.dumps(run_state, indent=2)))
    final = partial.with_name(partial.name.removeprefix(".").removesuffix(".partial"))
    if final.exists():  # a checkpoint of this step from a run that was not resumed from it
        shutil.rmtree(final)
    os.replace(partial, final)
    fsync_directory(final.parent)
    if keep_last is not None:
        for _, old in checkpoints(final.parent.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_run_state(directory: Path) -> dict[str, Any]:
    """The ``run_state.json`` of a checkpoint folder.

    Raises:
        DamagedCheckpoint: it is truncated or corrupt (not JSON, or without the keys it holds).
        CheckpointError: it was written in another format version.
    """
    path = directory / STATE_NAME
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DamagedCheckpoint(f"{path} is truncated or corrupt ({_short(err)})") from err
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"{path} is corrupt (it holds no JSON object)")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: run checkpoint format {state.get('format_version')!r}, this "
                              f"deltadist reads {FORMAT_VERSION}.")
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise DamagedCheckpoint(f"{path} is corrupt (it lacks {', '.join(missing)})")
    return state


RESUMABLE_DIFFERENCES = frozenset({
    "output_dir", "training.save_every", "training.keep_last", "training.eval_every",
    "training.log_every", "training.eval_batch_size", "data.eval", "training.skip_nonfinite_steps",
    "training.report_to",
})
"""Config keys a resumed run may change: they do not alter the trajectory of training (skipping
non-finite steps changes only what a run that would stop does instead)."""


def check_same_job(saved: dict[str, Any], current: dict[str, Any], directory: Path) -> None:
    """Refuse to resume from ``directory`` with a config that trains differently.

    Raises:
        ConfigError: naming every key whose value differs, with both values.
    """
    differences = [f"{key}: {old!r} there, {new!r} now"
                   for key, old, new in _differences(saved, current) if key not in RESUMABLE_DIFFERENCES]
    if differences:
        raise ConfigError(f"--resume: the checkpoint {directory} was written by another job "
                          f"({'; '.join(differences)}); resume with its config, or use a new output_dir.")


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict) and prefix != "delta.":
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [(prefix.rstrip("."), old, new)]
