"""Errors that deltadist raises on bad input.

Every message names the problem and the fix. They are ``ValueError`` / ``OSError`` subclasses so
that code catching the builtin kinds keeps working.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable


class DeltaError(Exception):
    """Base class of all deltadist errors."""


class ConfigError(DeltaError, ValueError):
    """A delta config has an unknown key, an unknown ``delta_type`` or a bad value."""


class AddressingError(DeltaError, ValueError):
    """A module pattern matches nothing, or matches modules a method cannot modify."""


class SiteError(DeltaError, ValueError):
    """A delta method cannot be attached to the module a pattern selected."""


class CheckpointError(DeltaError, OSError):
    """A delta checkpoint is missing, truncated, corrupt, or does not fit the backbone."""


class BackboneMismatchError(CheckpointError):
    """A checkpoint was trained on another backbone checkpoint (fingerprint differs)."""


class ExportError(DeltaError, RuntimeError):
    """An export (``save_pretrained``) would silently leave out part of the model."""


class EngineError(DeltaError, RuntimeError):
    """An operation is not possible in the parallel setup the model is in."""


class TrainingError(DeltaError, RuntimeError):
    """A training job cannot go on: a step's loss or gradient norm is not finite (nan, inf)."""


class InteractiveError(DeltaError, RuntimeError):
    """The module picker page (``interactive_modify``) could not start, or ended without a selection."""


def closest(word: str, candidates: Iterable[str], limit: int = 5) -> list[str]:
    """The candidates most similar to ``word`` (for "did you mean" lists).

    A candidate scores by its best-matching dot-boundary suffix, so ``"atention.quer"`` finds
    ``"bert.encoder.layer.$.attention.self.query"``. Layer indices are folded to ``$`` so one
    suggestion stands for every layer.
    """
    pool = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "$", c) for c in candidates))

    def score(candidate: str) -> float:
        parts = candidate.split(".")
        return max(
            difflib.SequenceMatcher(None, word, ".".join(parts[i:])).ratio()
            for i in range(len(parts))
        )

    return sorted(pool, key=score, reverse=True)[:limit]
