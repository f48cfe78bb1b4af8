"""Turn ``modified_modules`` / ``exclude_modules`` into the list of sites a delta attaches to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from deltadist.addressing.common import common_name_index
from deltadist.addressing.names import Pattern, canonical_modules, parse_patterns
from deltadist.addressing.structures import STRUCTURE_MAPS
from deltadist.errors import AddressingError, closest


@dataclass(frozen=True)
class Site:
    """A module of the backbone that a delta attaches to."""

    name: str
    """Canonical dotted path from the backbone root."""
    module: nn.Module


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

    Raises:
        AddressingError: a pattern matches nothing (the closest names are listed), or defaults were
            asked for on a model no structure map knows.
    """
    modules = _without_skipped(canonical_modules(backbone), skip)
    use_defaults = modified_modules is None
    by_role = use_defaults or common_structure
    index = common_name_index(backbone) if by_role else {}
    if by_role and not index:
        known = ", ".join(sorted(t for s in STRUCTURE_MAPS for t in s.model_types))
        raise AddressingError(
            f"No common structure map recognises {type(backbone).__name__}, so "
            f"{'default targets' if use_defaults else 'common_structure names'} cannot be resolved. "
            f"Known model types: {known}. Pass modified_modules=[...] with real module names "
            "(see Visualization(model).structure_graph())."
        )
    patterns = parse_patterns(default_roles if use_defaults else modified_modules)
    excludes = parse_patterns(exclude_modules)
    candidates = _names_for_matching(modules, by_role, index)
    selected: dict[str, Site] = {}
    unmatched: list[Pattern] = []
    for pattern in patterns:
        test = pattern.matches_within if within else pattern.matches
        hits = [n for n, names in candidates.items() if any(test(c) for c in names)]
        if not hits:
            unmatched.append(pattern)
        for name in hits:
            if not any(e.matches_within(c) for e in excludes for c in candidates[name] + (name,)):
                selected.setdefault(name, Site(name, modules[name]))
    if unmatched and (not use_defaults or not selected):
        raise _no_match_error(unmatched, candidates, by_role)
    if not selected:
        raise AddressingError(
            f"exclude_modules={list(exclude_modules or [])} removes every module the patterns "
            "select, so there is nothing to modify. Narrow exclude_modules."
        )
    order = {n: i for i, n in enumerate(modules)}
    return sorted(selected.values(), key=lambda s: order[s.name])


def _without_skipped(modules: dict[str, nn.Module], skip: frozenset[int]) -> dict[str, nn.Module]:
    """Drop skipped modules and everything inside them."""
    roots = [n for n, m in modules.items() if id(m) in skip]
    return {
        n: m for n, m in modules.items()
        if not any(n == r or n.startswith(r + ".") for r in roots)
    }


def _no_match_error(
    unmatched: list[Pattern], candidates: dict[str, tuple[str, ...]], by_role: bool
) -> AddressingError:
    pool = [c for names in candidates.values() for c in names]
    kind = "common-structure names" if by_role else "module names"
    lines = [
        f"  {p.text!r}: closest {kind}: {', '.join(closest(p.text.removeprefix('[r]'), pool))}"
        for p in unmatched
    ]
    return AddressingError(
        "These patterns match no module of the backbone:\n"
        + "\n".join(lines)
        + "\nA plain pattern matches a dot-boundary suffix of a module name; prefix a pattern with "
        "[r] for a regular expression. Fix the pattern or drop it."
    )
