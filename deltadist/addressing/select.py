"""Turn ``modified_modules`` / ``exclude_modules`` into the list of sites a delta attaches to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from deltadist.addressing.common import common_name_index
from deltadist.addressing.linear import is_fused_experts, is_linear_module, parameter_sites
from deltadist.addressing.names import Pattern, canonical_modules, canonical_parameters, parse_patterns
from deltadist.addressing.structures import STRUCTURE_MAPS, TASK_HEAD
from deltadist.errors import AddressingError, closest

ALL_LINEAR = "all-linear"
"""In ``modified_modules``: every linear layer except the output head (``lm_head``, task heads)."""
DELTAS_KEYWORD = "deltas"
"""In ``unfrozen_modules`` / ``freeze_module(exclude=...)``: this delta's own parameters."""


@dataclass(frozen=True)
class Site:
    """A module of the backbone that a delta attaches to (and, for a span, where it reads from)."""

    name: str
    """Canonical dotted path from the backbone root."""
    module: nn.Module
    start_name: str | None = None
    """For a span: the canonical name of the module whose input the delta reads."""
    start: nn.Module | None = None
    parameter: str | None = None
    """For a parameter site (``name`` is ``<module>.<parameter>``, ``module`` the module holding
    it): the parameter's name in ``module`` (fused experts, a router's weight)."""


def _names_for_matching(
    modules: dict[str, nn.Module], by_role: bool, index: dict[str, tuple[str, ...]]
) -> dict[str, tuple[str, ...]]:
    if by_role:
        return {n: index[n] for n in modules if n in index}
    return {n: (n,) for n in modules if n}


def select_sites(
    backbone: nn.Module,
    modified_modules: Sequence[str] | None,
    default_roles: Sequence[str],
    exclude_modules: Sequence[str] | None = None,
    common_structure: bool = False,
    skip: frozenset[int] = frozenset(),
    within: bool = False,
    parameters: bool = False,
) -> list[Site]:
    """Resolve patterns to sites, in module order.

    Args:
        backbone: the user's model (possibly wrapped).
        modified_modules: user patterns; ``None`` means the method's ``default_roles``.
        default_roles: common-structure patterns used when ``modified_modules`` is ``None``.
        exclude_modules: patterns whose modules (and their subtrees) are never sites.
        common_structure: match ``modified_modules`` against common names instead of real ones.
        skip: ``id()`` of modules that may never be sites (deltas already attached).
        within: also select everything inside a selected module (``"attn"`` then selects
            ``attn.q``, ``attn.proj``... too), for methods that broadcast into sub-modules.
        parameters: also select parameter sites (:func:`parameter_sites`: fused experts, routers),
            for methods that change a parameter rather than a call (LoRA); ``"all-linear"`` then
            covers the fused experts too.

    Raises:
        AddressingError: a pattern matches nothing (the closest names are listed), or defaults were
            asked for on a model no structure map knows.
    """
    modules = without_skipped(canonical_modules(backbone), skip)
    held = parameter_sites(modules) if parameters else {}
    use_defaults = modified_modules is None
    by_role = use_defaults or common_structure
    index = _structure_index(backbone, use_defaults, held) if by_role else {}
    patterns = parse_patterns(default_roles if use_defaults else modified_modules)
    excludes = parse_patterns(exclude_modules)
    candidates = _names_for_matching({**modules, **dict.fromkeys(held)}, by_role, index)
    selected: dict[str, Site] = {}
    unmatched: list[Pattern] = []
    for pattern in patterns:
        if pattern.text == ALL_LINEAR:
            hits = _all_linear(backbone, modules, held)
        else:
            test = pattern.matches_within if within else pattern.matches
            hits = [n for n, names in candidates.items() if any(test(c) for c in names)]
        if not hits:
            unmatched.append(pattern)
        for name in hits:
            if not any(e.matches_within(c) for e in excludes for c in candidates[name] + (name,)):
                selected.setdefault(name, _site(name, modules, held))
    if unmatched and (not use_defaults or not selected):
        kind = "common-structure names" if by_role else "module names"
        pool = [c for names in candidates.values() for c in names]
        raise _no_match_error(unmatched, pool, kind, "match no module of the backbone")
    if not selected:
        raise AddressingError(
            f"exclude_modules={list(exclude_modules or [])} removes every module the patterns "
            "select, so there is nothing to modify. Narrow exclude_modules."
        )
    return _in_model_order(selected, modules, held)


def _in_model_order(selected: dict[str, Site], modules: dict[str, nn.Module],
                    held: dict[str, tuple[str, str]]) -> list[Site]:
    """``selected`` in module order, a parameter site right after its module."""
    order = {n: (i, "") for i, n in enumerate(modules)}
    order.update({n: (order[module][0], leaf) for n, (module, leaf) in held.items()})
    return sorted(selected.values(), key=lambda s: order[s.name])


def _site(name: str, modules: dict[str, nn.Module], held: dict[str, tuple[str, str]]) -> Site:
    """The site called ``name``: a module, or a parameter ``held`` by one."""
    if name in held:
        module, leaf = held[name]
        return Site(name, modules[module], parameter=leaf)
    return Site(name, modules[name])


def _structure_index(backbone: nn.Module, use_defaults: bool,
                     held: dict[str, tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    """The common names of ``backbone``'s modules, which role patterns (the method's defaults, or
    ``common_structure`` names) are matched against.

    Raises:
        AddressingError: no structure map knows the backbone, so no pattern could match.
    """
    index = common_name_index(backbone, extra=held)
    if not index:
        known = ", ".join(sorted(t for s in STRUCTURE_MAPS for t in s.model_types))
        raise AddressingError(
            f"No common structure map recognises {type(backbone).__name__}, so "
            f"{'default targets' if use_defaults else 'common_structure names'} cannot be resolved. "
            f"Known model types: {known}. Pass modified_modules=[...] with real module names "
            "(see Visualization(model).structure_graph())."
        )
    return index


def without_skipped(modules: dict[str, nn.Module], skip: frozenset[int]) -> dict[str, nn.Module]:
    """Drop skipped modules and everything inside them."""
    roots = [n for n, m in modules.items() if id(m) in skip]
    return {
        n: m for n, m in modules.items()
        if not any(n == r or n.startswith(r + ".") for r in roots)
    }


def _all_linear(backbone: nn.Module, modules: dict[str, nn.Module],
                held: dict[str, tuple[str, str]]) -> list[str]:
    """Every linear layer but the output head: the ``lm_head.proj`` and task-head roles, and the
    module transformers reports as the output embeddings (as PEFT's ``"all-linear"``); and the
    fused expert parameters among the parameter sites ``held`` (which PEFT's does not cover)."""
    heads = [n for n, commons in common_name_index(backbone).items()
             if "lm_head.proj" in commons or TASK_HEAD in commons]
    output = getattr(backbone, "get_output_embeddings", None)
    output = output() if callable(output) else None
    return [
        n for n, m in modules.items()
        if n and is_linear_module(m) and m is not output
        and not any(n == h or n.startswith(h + ".") for h in heads)
    ] + [n for n, (module, leaf) in held.items() if is_fused_experts(modules[module]._parameters[leaf])]


def select_kept_parameters(backbone: nn.Module, patterns: Sequence[str],
                           skip: frozenset[int] | set[int] = frozenset()) -> tuple[str, ...]:
    """Canonical names of the backbone parameters that ``patterns`` keep trainable, in model order.

    A pattern selects a module with its subtree (``"classifier"``) or parameters by name
    (``"bias"``), with the matching rules of ``modified_modules``; :data:`DELTAS_KEYWORD` is left
    to the caller.

    Args:
        backbone: the model.
        patterns: ``unfrozen_modules`` or ``freeze_module(exclude=...)``.
        skip: ``id()`` of parameters that are not the backbone's (every delta's).

    Raises:
        AddressingError: a pattern matches no backbone parameter (the closest names are listed).
    """
    if all(p == DELTAS_KEYWORD for p in patterns):
        return ()
    params = [n for n, p in canonical_parameters(backbone).items() if id(p) not in skip]
    kept: dict[str, None] = {}
    unmatched: list[Pattern] = []
    for pattern in parse_patterns([p for p in patterns if p != DELTAS_KEYWORD]):
        hits = [n for n in params if pattern.matches_within(n)]
        if not hits:
            unmatched.append(pattern)
        kept.update(dict.fromkeys(hits))
    if unmatched:
        modules = [n.rpartition(".")[0] for n in params]
        raise _no_match_error(
            unmatched, [*dict.fromkeys(modules), *params], "module or parameter names",
            f"(in unfrozen_modules / freeze_module(exclude=...)) match no backbone parameter; "
            f"{DELTAS_KEYWORD!r} stands for the delta's own parameters",
        )
    order = {n: i for i, n in enumerate(params)}
    return tuple(sorted(kept, key=order.__getitem__))


def _no_match_error(unmatched: list[Pattern], pool: list[str], kind: str, what: str) -> AddressingError:
    lines = [
        f"  {p.text!r}: closest {kind}: {', '.join(closest(p.text.removeprefix('[r]'), pool))}"
        for p in unmatched
    ]
    return AddressingError(
        f"These patterns {what}:\n"
        + "\n".join(lines)
        + "\nA plain pattern matches a dot-boundary suffix of a module name; prefix a pattern with "
        "[r] for a regular expression. Fix the pattern or drop it."
    )
