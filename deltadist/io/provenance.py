"""Versions recorded in every checkpoint, so a delta says what produced it."""

from __future__ import annotations

import functools
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
