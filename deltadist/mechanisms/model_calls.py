"""Reading a transformers model call: its arguments by name, and how much of it is cached.

The one place that knows how transformers releases differ in what a forward call carries
(a ``Cache`` object in 4.5x and 5.x, a legacy tuple before; ``past_key_values``, or ``cache`` from
5.2x on); nothing else inspects them.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn


@functools.lru_cache(maxsize=None)
def _parameter_names(forward: Any) -> tuple[str, ...]:
    """Names of ``forward``'s parameters that may be passed by position (``self`` excluded)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(forward).parameters.values() if p.kind in kinds]
    return tuple(names[1:] if names and names[0] == "self" else names)


def call_by_name(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a call to ``module`` as one ``{name: value}`` dict.

    Raises:
        TypeError: more positional arguments than ``forward`` names (``*args``), which a
            rewrite by name cannot keep in place.
    """
    names = _parameter_names(type(module).forward)
    if len(args) > len(names):
        raise TypeError(f"{type(module).__name__}.forward was called with {len(args)} positional "
                        "arguments; pass the inputs by name (input_ids=..., attention_mask=...).")
    return {**dict(zip(names, args)), **kwargs}


CACHE_KEYS = ("past_key_values", "cache")
"""Keywords a model call passes its key/value cache under (``cache`` from transformers 5.2x on)."""


def cached_length(call: dict[str, Any]) -> int:
    """How many positions the key/value cache of a call (by name) already holds (0 for none)."""
    past_key_values = next((call[k] for k in CACHE_KEYS if call.get(k) is not None), None)
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    if isinstance(past_key_values, (tuple, list)) and past_key_values and past_key_values[0]:
        return int(past_key_values[0][0].shape[-2])  # legacy tuple of (key, value) per layer
    return 0
