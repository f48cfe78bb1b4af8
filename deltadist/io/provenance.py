"""Versions recorded in every checkpoint, so a delta says what produced it; the git commit a
training run was started from."""

from __future__ import annotations

import functools
import subprocess
from importlib.metadata import PackageNotFoundError, version

_PACKAGES = ("deltadist", "torch", "transformers", "safetensors")


@functools.cache
def _installed_versions() -> tuple[tuple[str, str], ...]:
    """Read once per process: each lookup parses a package's metadata file."""
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return tuple(found.items())


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape a checkpoint (missing ones left out)."""
    return dict(_installed_versions())


def git_commit(directory: str | None = None) -> str | None:
    """The commit checked out in ``directory`` (default: the working directory), if it is in a git
    repository and git is installed; else ``None``."""
    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True,
                               timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip() or None if found.returncode == 0 else None
