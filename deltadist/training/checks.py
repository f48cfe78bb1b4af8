"""Checks of a job that need neither the model nor the data: found before the weights load
(``output_dir`` can be written), or said as soon as the plan is known (a warm-up longer than the run)."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

from deltadist.errors import ConfigError


def check_writable(output_dir: str | os.PathLike) -> None:
    """Create ``output_dir`` (with its parents) and write and remove a file in it, as every rank
    will write its checkpoint files there.

    Raises:
        ConfigError: it cannot be created or written, naming why.
    """
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".deltadist-write-check-"):
            pass
    except OSError as err:
        reason = f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)
        raise _unwritable(output_dir, reason) from err


def check_could_write(output_dir: str | os.PathLike) -> None:
    """:func:`check_writable` without creating or writing anything (``deltadist train --dry-run``):
    the nearest existing directory on the way must be one this user can write into.

    Raises:
        ConfigError: as :func:`check_writable` would.
    """
    path = Path(output_dir)
    below = path
    for existing in (path, *path.parents):
        if existing.exists():
            break
        below = existing
    if not existing.is_dir():  # mkdir fails on the first directory it tries to make there
        reason = f"{path}: File exists" if existing == path else f"{below}: Not a directory"
        raise _unwritable(output_dir, reason)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _unwritable(output_dir, f"{existing if existing == path else below}: Permission denied")


def _unwritable(output_dir: str | os.PathLike, reason: str) -> ConfigError:
    return ConfigError(f"output_dir: {os.fspath(output_dir)} cannot be written ({reason}); choose "
                       "an output_dir this user can create and write.")


def check_engine_limits(engine: str, accumulates: bool, steps_in_backward: bool, skip_nonfinite: bool,
                        accumulation: int | None = None) -> None:
    """The job's settings the engine cannot run: skipping non-finite steps where the optimizer steps
    inside the backward; several micro-batches a step where it takes one (``accumulation``: the
    plan's, once known).

    Raises:
        ConfigError: naming the setting and what to set.
    """
    if skip_nonfinite and steps_in_backward:
        raise ConfigError(f"training.skip_nonfinite_steps does not work with engine {engine}: it "
                          "takes the optimizer step inside its backward, before the loss is known; "
                          "set training.skip_nonfinite_steps: false.")
    if accumulation is not None and accumulation > 1 and not accumulates:
        raise ConfigError(f"engine: {engine} takes one forward per step here; set "
                          "training.gradient_accumulation_steps: 1 and micro_batch_size: null.")


def warn_if_warmup_outlasts(warmup_steps: int, total_steps: int) -> None:
    """Warn when the linear warm-up does not end within the run: the learning rate then never
    reaches ``training.lr`` (its last step has ``total / (warmup + 1)`` of it)."""
    if warmup_steps < total_steps:
        return
    peak = total_steps / (warmup_steps + 1)
    warnings.warn(f"training.warmup_steps ({warmup_steps}) is not shorter than the run ({total_steps} "
                  f"optimizer steps): the learning rate warms up the whole run and reaches only {peak:.0%} "
                  "of training.lr; lower training.warmup_steps or train for more steps.", stacklevel=3)
