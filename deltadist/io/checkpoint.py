"""Delta checkpoints on disk: safetensors plus a JSON config, written atomically, read safely.

Layout of a checkpoint directory::

    delta.safetensors    the delta tensors; its header metadata also holds the config (authoritative)
    delta_config.json    the same config, for people and hub listings

``delta.safetensors`` is the unit of atomicity: it is written to a temporary file in the same
directory, flushed to disk and moved over the old one with ``os.replace``, so a crash at any moment
leaves either the previous checkpoint or the new one, never a mix (other files in the directory are
never touched). The JSON mirror is replaced afterwards; if a crash left it from an older save, the
loader notices the differing ``save_id`` and trusts the safetensors header. Both files get the mode
any new file gets (``0o666`` less the umask), and a failed write raises :class:`CheckpointError`
naming the directory, with nothing half-written left behind.

The config carries ``weights_sha256`` (:func:`tensors_sha256`), checked when the tensors are read,
so a file changed on disk or in transfer is refused instead of loaded.

Loading reads JSON and safetensors only: no pickle, no code runs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deltadist.core import jsontext
from deltadist.core.config import CONFIG_FORMAT_VERSION
from deltadist.errors import CheckpointError
from deltadist.io.provenance import library_versions

WEIGHTS_NAME = "delta.safetensors"
CONFIG_NAME = "delta_config.json"
_METADATA_KEY = "deltadist_config"
CHECKSUM_KEY = "weights_sha256"
"""Config key of :func:`tensors_sha256` of the weights (absent in checkpoints from older versions)."""

# What a failed write of each file leaves behind, for the error message.
_UNCHANGED_MEANS = {
    WEIGHTS_NAME: "the previous checkpoint, if any, is intact",
    CONFIG_NAME: f"the new {WEIGHTS_NAME} is complete and the loader uses the config in its header",
    "adapter_model.safetensors": "the previous adapter, if any, is intact",
    "adapter_config.json": "the new adapter_model.safetensors is complete but the config beside it is old",
}
_PEFT_NAMES = ("adapter_config.json", "adapter_model.safetensors")
OPENDELTA_WEIGHTS = "pytorch_model.bin"
"""The weights file of a checkpoint OpenDelta wrote (see :mod:`deltadist.integrations.opendelta`)."""
"""A PEFT adapter's files (see :mod:`deltadist.io.peft`), accepted where a checkpoint is."""


def write_checkpoint(directory: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     config: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``config`` into ``directory`` atomically (main rank only).

    Returns:
        The path of the weights file.

    Raises:
        CheckpointError: ``directory`` is a file or under one, or a write failed (disk full, no
            permission); the files already in ``directory`` are then left as they were.
    """
    directory = Path(directory)
    _make_directory(directory)
    tensors = dict(tensors)
    config = {**config, "save_id": uuid.uuid4().hex, CHECKSUM_KEY: tensors_sha256(tensors)}
    text = json.dumps(config, indent=2, sort_keys=True)
    weights = directory / WEIGHTS_NAME
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={_METADATA_KEY: text}))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text + "\n"))
    return weights


def remove_other_format(directory: str | os.PathLike, written: str) -> list[str]:
    """After a save in format ``written`` (``"deltadist"`` or ``"peft"``), remove the other
    format's files from ``directory`` so it holds exactly one checkpoint (a loader would otherwise
    pick one of two); warn naming what was removed. Returns the removed file names."""
    other = _PEFT_NAMES if written == "deltadist" else (WEIGHTS_NAME, CONFIG_NAME)
    removed = [name for name in other if (Path(directory) / name).is_file()]
    for name in removed:
        (Path(directory) / name).unlink()
    if removed:
        fsync_directory(Path(directory))
        warnings.warn(f"{directory} held an earlier checkpoint in the other format; removed "
                      f"{', '.join(removed)} so that the {written} checkpoint just written is the only one.",
                      stacklevel=3)
    return removed


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor in sorted key order: ``[key, dtype, shape]`` as a JSON line, then
    its raw bytes (native order, little-endian on every platform PyTorch trains on).

    Hashing tensors rather than the file's data section covers the header's names, dtypes and
    shapes too, needs no second read of the file when saving (the hash must be known before the
    header holding it is written), and checks exactly what the loader returns. It is one pass over
    bytes already in memory: no copy for contiguous CPU tensors.
    """
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode() + b"\n")
        # reshape(-1) first: a 0-d tensor cannot be viewed as bytes of another element size.
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _make_directory(directory: Path) -> None:
    blocker = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
    if blocker == directory:
        ours = directory.name in (WEIGHTS_NAME, CONFIG_NAME)
        fix = (f"Pass the directory that holds it: {directory.parent}" if ours
               else "Pass a directory path instead (a new one is created); the file is left untouched")
        raise CheckpointError(
            f"{directory} is an existing file, not a directory: save_finetuned() writes a checkpoint "
            f"directory holding {WEIGHTS_NAME} and {CONFIG_NAME}. {fix}."
        )
    if blocker is not None:
        raise CheckpointError(
            f"Cannot create the checkpoint directory {directory}: {blocker} is a file, not a directory. "
            "Pass a path whose parents are directories, or move that file away."
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(
            f"Cannot create the checkpoint directory {directory} ({err}). {_write_fix(err)}"
        ) from err


def atomic_write(target: Path, write: Callable[[Path], object]) -> None:
    """Have ``write`` fill a temporary file beside ``target``, flush it and move it over ``target``."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    replaced = False
    try:
        # Created like any new file (0o666 less the umask; mkstemp would give 0o600). The writer may
        # swap the file for its own: safetensors >= 0.8 renames a 0o600 temp file over it
        # (safetensors#782), so the mode is put back before the file becomes the checkpoint.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        replaced = True
        fsync_directory(target.parent)
    except (OSError, SafetensorError) as err:  # safetensors reports disk errors as SafetensorError
        state = ("was replaced but may not be on disk yet" if replaced
                 else f"is left as it was: {_UNCHANGED_MEANS.get(target.name, 'nothing changed')}")
        raise CheckpointError(
            f"Could not save the delta checkpoint in {target.parent}: writing {target.name} failed "
            f"({type(err).__name__}: {err}). {_write_fix(err)} {target.name} there {state}; "
            "no temporary file remains."
        ) from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def fsync_directory(directory: Path) -> None:
    """Flush ``directory``'s entries (a rename into it) to disk, where the platform allows it."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_fix(err: BaseException) -> str:
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return "Free disk space there, or save to another directory."
    return "Check free disk space and write permission there, or save to another directory."


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
        siblings = (WEIGHTS_NAME, _PEFT_NAMES[0])
        if path.name not in (WEIGHTS_NAME, CONFIG_NAME, *_PEFT_NAMES) and not any(
                (path.parent / name).is_file() for name in siblings):
            raise CheckpointError(
                f"{path} is a file, not a delta checkpoint: there is no {WEIGHTS_NAME} beside it "
                f"(in {path.absolute().parent}). Pass the directory that save_finetuned() wrote (it holds "
                f"{WEIGHTS_NAME} and {CONFIG_NAME}), or a file inside it."
            )
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
            local_files_only=local_files_only, allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, *_PEFT_NAMES],
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
        raise _corrupt(weights, err) from err
    config = _stored_config(weights, metadata)
    if config is None:
        raise CheckpointError(
            f"{weights} has no deltadist config in its header; it was not written by "
            "save_finetuned(). Pass delta_config= to load raw tensors."
        )
    _check_format_version(weights, config)
    _warn_if_mirror_stale(directory, config)
    return config


def _check_format_version(weights: Path, config: Mapping[str, Any]) -> None:
    """Refuse a config written in a format newer than this deltadist's (absent: the oldest)."""
    version = config.get("format_version", CONFIG_FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{weights}: its config's format_version must be an integer, got "
                              f"{version!r}. The file is corrupt: save the delta again or restore it.")
    if version > CONFIG_FORMAT_VERSION:
        raise CheckpointError(
            f"{weights} was written by a newer deltadist: its config has format_version {version}, and "
            f"this deltadist ({_own_version()}) reads format_version {CONFIG_FORMAT_VERSION} and older. "
            "Upgrade deltadist (pip install --upgrade deltadist) to load it."
        )


def _own_version() -> str:
    return library_versions().get("deltadist", "version unknown")


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``directory`` (CPU), checked against its stored checksum.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or its tensors differ from the
            ``weights_sha256`` saved with them (checkpoints saved without one are not checked).
    """
    weights = _weights_file(directory)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in sorted(handle.keys())}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _corrupt(weights, err) from err
    expected = (_stored_config(weights, metadata) or {}).get(CHECKSUM_KEY)
    if expected is not None and tensors_sha256(tensors) != expected:
        raise CheckpointError(
            f"{weights} was modified or corrupted after it was saved: its tensors do not match the "
            f"SHA-256 checksum ({CHECKSUM_KEY}) stored with them. Save the delta again, or restore "
            "the file from a backup (or download it again)."
        )
    return tensors


def _stored_config(weights: Path, metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The config in the header ``metadata`` of ``weights``, or ``None`` if it holds none."""
    if _METADATA_KEY not in metadata:
        return None
    try:
        config = jsontext.loads(metadata[_METADATA_KEY])
    except jsontext.JSONTooDeepError as err:
        raise _too_deep(weights, f"its {_METADATA_KEY!r} header entry", err) from err
    except ValueError as err:
        raise _corrupt(weights, err) from err
    if not isinstance(config, dict):
        raise _corrupt(weights, ValueError(f"its {_METADATA_KEY!r} header entry is not a JSON object"))
    return config


def _too_deep(path: Path, what: str, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path}: {what} is not a config deltadist can have written ({err}; a delta config nests "
        "3 levels). The file is corrupt or was not made by save_finetuned(): save the delta again, "
        "or restore the file."
    )


def _corrupt(weights: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{weights} is truncated or corrupt ({err}). Save the delta again or restore the file."
    )


def _weights_file(directory: Path) -> Path:
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        nested = [name for name in present if (directory / name / WEIGHTS_NAME).is_file()]
        hint = f" These subdirectories hold one: {', '.join(nested)}." if nested else ""
        if _PEFT_NAMES[0] in present:
            hint += (" It is a PEFT adapter: AutoDeltaModel.from_finetuned(path, backbone_model=...) "
                     "loads it as a LoRA delta.")
        if OPENDELTA_WEIGHTS in present:
            hint += (f" Its {OPENDELTA_WEIGHTS} looks like a checkpoint OpenDelta wrote (a pickle, which "
                     "deltadist does not load directly): convert it once with `deltadist import --from "
                     "opendelta "
                     f"{directory} OUT --model BACKBONE` (or deltadist.import_opendelta) and load OUT.")
        raise CheckpointError(
            f"No delta checkpoint in {directory}: {weights} is missing (the directory holds: "
            f"{', '.join(present) or 'nothing'}). Pass the directory that save_finetuned() wrote.{hint}"
        )
    return weights


def _warn_if_mirror_stale(directory: Path, config: dict[str, Any]) -> None:
    mirror = directory / CONFIG_NAME
    try:
        mirrored = jsontext.loads(mirror.read_text())
    except jsontext.JSONTooDeepError as err:
        raise _too_deep(mirror, "its JSON", err) from err
    except (OSError, ValueError):
        mirrored = {}
    if not isinstance(mirrored, dict):
        mirrored = {}
    if mirrored.get("save_id") != config.get("save_id"):
        warnings.warn(
            f"{mirror} does not belong to the weights beside it (an interrupted save?); "
            f"using the config stored in {WEIGHTS_NAME}.",
            stacklevel=3,
        )
