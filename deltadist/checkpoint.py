"""Delta checkpoints on disk: safetensors plus a JSON config, written atomically, read safely.

Layout of a checkpoint directory::

    delta.safetensors    the delta tensors; its header metadata also holds the config (authoritative)
    delta_config.json    the same config, for people and hub listings

``delta.safetensors`` is the unit of atomicity: it is written to a temporary file in the same
directory, flushed to disk and moved over the old one with ``os.replace``, so a crash at any moment
leaves either the previous checkpoint or the new one, never a mix (other files in the directory are
never touched). The JSON mirror is replaced afterwards; if a crash left it from an older save, the
loader notices the differing ``save_id`` and trusts the safetensors header.

Loading reads JSON and safetensors only: no pickle, no code runs.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deltadist.errors import CheckpointError

WEIGHTS_NAME = "delta.safetensors"
CONFIG_NAME = "delta_config.json"
_METADATA_KEY = "deltadist_config"


def write_checkpoint(directory: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``config`` into ``directory`` atomically (main rank only).

    Returns:
        The path of the weights file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {**config, "save_id": uuid.uuid4().hex}
    text = json.dumps(config, indent=2, sort_keys=True)
    weights = directory / WEIGHTS_NAME
    _atomic_write(weights, lambda tmp: save_file(dict(tensors), tmp, metadata={_METADATA_KEY: text}))
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text + "\n"))
    return weights


def _atomic_write(target: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def resolve_checkpoint(
    path_or_repo: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    revision: str | None = None,
) -> Path:
    """A local checkpoint directory for a directory, a file inside one, or a hub repo id.

    Raises:
        CheckpointError: nothing local by that name and the hub has no such repo (or is offline).
    """
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    if str(path_or_repo).count("/") != 1 or str(path_or_repo).startswith((".", "/", "~")):
        raise CheckpointError(
            f"No delta checkpoint at {str(path_or_repo)!r}: it is not a local directory or file, "
            "nor a hub repo id of the form 'user/repo'. Check the path."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(
            repo_id=str(path_or_repo), revision=revision, cache_dir=cache_dir,
            local_files_only=local_files_only, allow_patterns=[WEIGHTS_NAME, CONFIG_NAME],
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        raise CheckpointError(
            f"Could not get the delta checkpoint {str(path_or_repo)!r} from the hub or its local "
            f"cache ({type(err).__name__}: {err}). Check the repo id, or pass a local directory."
        ) from err
    return Path(local)


def read_config(directory: Path) -> dict[str, Any]:
    """The config stored with the checkpoint in ``directory`` (from the safetensors header)."""
    weights = _weights_file(directory)
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{weights} is truncated or corrupt ({err}). Save the delta again or restore the file."
        ) from err
    if _METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{weights} has no deltadist config in its header; it was not written by "
            "save_finetuned(). Pass delta_config= to load raw tensors."
        )
    config = json.loads(metadata[_METADATA_KEY])
    _warn_if_mirror_stale(directory, config)
    return config


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``directory`` (CPU)."""
    weights = _weights_file(directory)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{weights} is truncated or corrupt ({err}). Save the delta again or restore the file."
        ) from err


def _weights_file(directory: Path) -> Path:
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        raise CheckpointError(
            f"{weights} is missing (directory holds: {', '.join(present) or 'nothing'}). "
            "Point to the directory save_finetuned() wrote."
        )
    return weights


def _warn_if_mirror_stale(directory: Path, config: dict[str, Any]) -> None:
    mirror = directory / CONFIG_NAME
    try:
        mirrored = json.loads(mirror.read_text())
    except (OSError, ValueError):
        mirrored = {}
    if mirrored.get("save_id") != config.get("save_id"):
        warnings.warn(
            f"{mirror} does not belong to the weights beside it (an interrupted save?); "
            f"using the config stored in {WEIGHTS_NAME}.",
            stacklevel=3,
        )
