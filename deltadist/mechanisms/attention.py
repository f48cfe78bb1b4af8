"""Key/value prefixes inside attention, through transformers' public ``AttentionInterface``.

transformers models look their attention function up by ``config._attn_implementation`` in
``ALL_ATTENTION_FUNCTIONS`` and call it with the attention module and its final query, key and
value -- after rotary embeddings, after the cache update. Prefix tuning needs exactly that point:
a prefix joined there is seen by every query, never enters the cache (so cached and uncached
generation agree), and has the key/value head count and head size of the call.

While a prefix is attached, the configs of the modules carrying one name ``deltadist_prefix:<impl>``,
registered in ``ALL_ATTENTION_FUNCTIONS`` (a wrapper of ``<impl>``) and in
``ALL_MASK_ATTENTION_FUNCTIONS`` (``<impl>``'s own masks); the last prefix to go restores the
config. Modules without a prefix run ``<impl>`` unchanged. No ``forward`` is reassigned and no
hook is needed: the wrapper finds the prefixes as the attention module's own children that have
joined it (their ``call_state``), so each layer of a compiled graph reads its own, and a copy of
the model runs its own. This module is the only one that knows these transformers internals.
:data:`KEY_VALUE_PREFIX` is the mechanism that routes a prefix delta this way.
"""

from __future__ import annotations

import sys
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from deltadist.core.mechanism import Mechanism
from deltadist.errors import SiteError
from deltadist.mechanisms.rows import rows_for

if TYPE_CHECKING:
    from deltadist.core.attach import Attachment

ROUTE_PREFIX = "deltadist_prefix:"
"""Attention implementations deltadist registers: ``deltadist_prefix:sdpa``, ``...:eager``."""
ROUTABLE = ("sdpa", "eager")
"""Implementations a prefix can wrap (their masks are 4-D tensors deltadist can extend)."""

_ROUTED: dict[int, list[Any]] = {}
"""``id(config)`` -> ``[config, original implementation, number of routes]``: attach-time
bookkeeping (read when a route is added or removed, never during a call). Configs are not
hashable, and an attribute set on one would be saved with it."""


def routing_problem(module: nn.Module) -> str | None:
    """Why a prefix cannot join ``module``'s attention, or ``None`` if it can."""
    source = sys.modules.get(type(module).__module__)
    if source is None or "ALL_ATTENTION_FUNCTIONS" not in vars(source):
        return (f"{type(module).__name__} computes attention without transformers' AttentionInterface in "
                "this transformers release (BERT, RoBERTa, DistilBERT and T5 route through it from "
                "transformers 5); upgrade transformers or use another method there")
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if implementation is None:
        return f"{type(module).__name__} has no config._attn_implementation (not a transformers attention)"
    inner = implementation.removeprefix(ROUTE_PREFIX)
    if inner not in ROUTABLE:
        return (f"its attention implementation is {inner!r}; prefixes work with 'sdpa' and 'eager' "
                "(model.set_attn_implementation('sdpa'))")
    return None


class PrefixRoute:
    """A prefix delta joined to one attention module; :meth:`remove` takes it out (a hook handle's
    API, so attach and detach treat it like the hooks of other mechanisms)."""

    def __init__(self, module: nn.Module, prefix: nn.Module, order: int) -> None:
        problem = routing_problem(module)
        if problem:
            raise SiteError(problem)
        # The prefix weakly: routes are kept beside the module (as hook handles are), and a strong
        # reference would keep the module, and the whole model, alive after the model is dropped.
        self.prefix, self.config = weakref.ref(prefix), module.config
        prefix.call_state.joined, prefix.call_state.order = True, order
        _route(self.config)

    def remove(self) -> None:
        """Take the prefix out of its attention's calls (the last one out restores the config)."""
        prefix = self.prefix()
        if prefix is not None and prefix.call_state.joined:
            prefix.call_state.joined = False
            _unroute(self.config)


def _route(config: Any) -> None:
    entry = _ROUTED.get(id(config))
    if entry is None:
        original = config._attn_implementation
        entry = _ROUTED[id(config)] = [config, original, 0]
        config._attn_implementation = _registered(original)
    entry[2] += 1


def _unroute(config: Any) -> None:
    entry = _ROUTED[id(config)]
    entry[2] -= 1
    if entry[2] == 0:
        config._attn_implementation = entry[1]
        del _ROUTED[id(config)]


def _registered(inner: str) -> str:
    """The name of the wrapper of ``inner``, registered on first use."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = ROUTE_PREFIX + inner
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _wrapper(inner))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def _inner_function(module: nn.Module, inner: str) -> Callable[..., Any]:
    """``inner``'s attention function; for ``eager``, the module's own family's."""
    if inner != "eager":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS[inner]
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise SiteError(f"{type(module).__name__}'s module has no eager_attention_forward; run the model "
                        "with attn_implementation='sdpa' to use prefixes.")
    return function


def _wrapper(inner: str) -> Callable[..., Any]:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        prefixes = sorted((child for child in module.children()
                           if getattr(child, "joins_attention", False) and child.call_state.joined),
                          key=lambda child: child.call_state.order)
        if prefixes:
            key, value, attention_mask, kwargs = _join_prefixes(
                module, query, key, value, attention_mask, kwargs, prefixes, inner)
        return _inner_function(module, inner)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"deltadist_prefix_{inner}"
    return attention


def _join_prefixes(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   mask: torch.Tensor | None, kwargs: dict[str, Any], prefixes: list[nn.Module],
                   inner: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """Prefixes before the keys and values (``[B, kv_heads, K, d]``); the mask and a position bias
    (T5) extended so every query sees them."""
    batch, heads, length, head_dim = key.shape
    pairs = [prefix(batch, heads, head_dim, key.dtype) for prefix in prefixes]
    keys = torch.cat([k for k, _ in pairs] + [key], dim=2)
    values = torch.cat([v for _, v in pairs] + [value], dim=2)
    added = keys.shape[2] - length
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", False) if causal is None else causal
    if mask is None and inner == "sdpa" and causal and query.shape[2] > 1:
        # sdpa would apply is_causal aligned to the top-left corner of the longer key sequence.
        mask = _causal_mask(query.shape[2], length, query.device)
    served = _served_columns(prefixes, [k.shape[2] for k, _ in pairs], batch, key.device)
    if served is not None:  # a mixed batch: hide each prefix from the rows it does not serve
        if mask is None:
            mask = torch.ones(1, 1, query.shape[2], length, dtype=torch.bool, device=key.device)
        mask = torch.cat([_column_mask(served, mask), mask.expand(batch, -1, -1, -1)], dim=-1)
    elif mask is not None:
        mask = _extend_left(mask, added, True if mask.dtype == torch.bool else 0.0)
    bias = kwargs.get("position_bias")
    if isinstance(bias, torch.Tensor):
        kwargs = {**kwargs, "position_bias": _extend_left(bias, added, 0.0)}
    return keys, values, mask, kwargs


def _served_columns(prefixes: list[nn.Module], widths: list[int], batch: int,
                    device: torch.device) -> torch.Tensor | None:
    """``[batch, P_total]`` booleans: which prefix positions each row may see, inside a mixed batch
    (:mod:`deltadist.mechanisms.rows`); ``None`` when every prefix serves every row."""
    rows = [rows_for(prefix, batch, device) for prefix in prefixes]
    if all(r is None for r in rows):
        return None
    columns = []
    for served, width in zip(rows, widths):
        keep = torch.ones(batch, dtype=torch.bool, device=device) if served is None else \
            torch.zeros(batch, dtype=torch.bool, device=device).index_fill_(0, served, True)
        columns.append(keep[:, None].expand(batch, width))
    return torch.cat(columns, dim=1)


def _column_mask(served: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The prefix columns of ``mask`` (``[B|1, H|1, Q, K]``, boolean or additive) for ``served``."""
    shape = (served.shape[0], mask.shape[1], mask.shape[2], served.shape[1])
    columns = served[:, None, None, :].expand(shape)
    if mask.dtype == torch.bool:
        return columns
    hidden = torch.finfo(mask.dtype).min
    return torch.zeros(shape, dtype=mask.dtype, device=mask.device).masked_fill(~columns, hidden)


def _causal_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, Q, K]`` boolean: the last ``Q`` of ``K`` positions, each seeing itself and before."""
    rows = torch.arange(queries, device=device)[:, None] + (keys - queries)
    return (torch.arange(keys, device=device)[None] <= rows)[None, None]


def _extend_left(tensor: torch.Tensor, count: int, value: bool | float) -> torch.Tensor:
    """``[..., K]`` -> ``[..., count + K]`` with ``value`` in the new leading columns."""
    pad = tensor.new_full((*tensor.shape[:-1], count), value)
    return torch.cat([pad, tensor], dim=-1)


class KeyValuePrefix(Mechanism):
    """A prefix joined to an attention module's keys and values (no hooks: a route)."""

    name = "key_value_prefix"

    def wire(self, att: "Attachment", module: nn.Module) -> list[Any]:
        # In a mixed batch the prefix serves some rows only: the others' mask hides its positions.
        return [PrefixRoute(module, att.delta, att.order)]


KEY_VALUE_PREFIX = KeyValuePrefix()
