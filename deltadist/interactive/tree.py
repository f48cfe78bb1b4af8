"""What the picker page shows and what it may select: the folded module tree as JSON-ready data.

The tree is :class:`~deltadist.interactive.visualize.Visualization`'s (same folding, names, classes, logical
parameter shapes, common-structure roles, delta modules marked), so the page and
``structure_graph()`` agree. A folded node lists every module it stands for in ``paths`` (selecting
it selects them all) and keeps its blocks as ``members``, which the page shows when a user unfolds it.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterator

from torch import nn

from deltadist.addressing.names import canonical_modules
from deltadist.addressing.select import without_skipped
from deltadist.core import attach as mechanisms
from deltadist.engines import Engine, detect_engine
from deltadist.interactive.visualize import ModuleNode, module_tree


def page_tree(model: nn.Module, engine: Engine | None = None) -> dict[str, Any]:
    """The folded tree of ``model`` for the page, as nested dicts.

    Each node: ``id`` (unique), ``name`` (``"0-79"`` for a fold), ``cls``, ``count`` (blocks a fold
    stands for), ``paths`` (canonical names of the modules it stands for), ``roles`` (common-structure
    names, index ranges on a fold), ``params`` (``[name, logical shape, kind]`` of its own parameters;
    kind is ``trainable``, ``frozen``, ``delta`` or ``frozen delta``), ``size`` (parameters in one
    block's subtree), ``delta`` (a delta module), ``pick`` (may be selected: not the root, not in a
    delta), ``kids`` and ``members`` (a fold's blocks, each a node).
    """
    root = module_tree(model, engine if engine is not None else detect_engine(model), commons=True)
    return _as_dict(root, itertools.count(), in_delta=False)


def _as_dict(node: ModuleNode, ids: Iterator[int], in_delta: bool) -> dict[str, Any]:
    in_delta = in_delta or node.is_delta
    own = sum(math.prod(shape) for _, shape, _ in node.params)
    kids = [_as_dict(child, ids, in_delta) for child in node.children]
    return {
        "id": next(ids), "name": node.name, "cls": node.cls, "count": node.count,
        "paths": list(node.paths), "roles": list(node.commons),
        "params": [[name, list(shape), kind] for name, shape, kind in node.params],
        "size": own + sum(kid["size"] * kid["count"] for kid in kids),
        "delta": node.is_delta, "pick": not in_delta and node.paths != ("",),
        "kids": kids, "members": [_as_dict(member, ids, in_delta) for member in node.members],
    }


def selectable_names(model: nn.Module) -> list[str]:
    """Canonical names of every module a pattern may select, in model order: what
    :func:`~deltadist.addressing.select.select_sites` matches (the root and deltas left out),
    including modules the page hides (no parameters)."""
    return [name for name in without_skipped(canonical_modules(model), delta_module_ids(model)) if name]


def delta_module_ids(model: nn.Module) -> frozenset[int]:
    """``id()`` of every delta module attached to ``model`` (never sites; their insides neither)."""
    return frozenset(id(module) for module in mechanisms.delta_modules(model).values())

