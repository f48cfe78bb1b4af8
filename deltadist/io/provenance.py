"""Versions recorded in every checkpoint, so a delta says what produced it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

_PACKAGES = ("deltadist", "torch", "transformers", "safetensors")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape a checkpoint (missing ones left out)."""
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found
