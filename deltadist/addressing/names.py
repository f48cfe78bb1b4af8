"""Name-based addressing: which modules a pattern selects.

Matching order (documented once, used everywhere):

1. Names are *canonical*: wrapper segments that engines and ``torch.compile`` insert
   (``_orig_mod``, ``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``) are removed, and so is a
   leading ``module.`` when the root is a single-child wrapper (DDP, a DeepSpeed engine). A pattern
   therefore selects the same modules before and after wrapping.
2. A plain pattern matches a name equal to it or ending with ``"." + pattern`` (dot boundaries:
   ``"q"`` matches ``attn.q`` but not ``attn.seq``).
3. A pattern starting with ``[r]`` is a regular expression that must match a whole dot-boundary
   suffix of the name. ``[r][0-5]\\.attention`` selects layers 0-5 only, not layer 10 (OpenDelta's
   unanchored search also selected ``10.attention``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from torch import nn

from deltadist.errors import AddressingError

REGEX_PREFIX = "[r]"
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


@dataclass(frozen=True)
class Pattern:
    """One user pattern, parsed once.

    Raises:
        AddressingError: a ``[r]`` pattern is not a valid regular expression.
    """

    text: str
    regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    """The compiled expression of a ``[r]`` pattern, ``None`` for a plain one."""

    def __post_init__(self) -> None:
        # Compiled here, not on first match, so a bad regex fails where the patterns are parsed,
        # for every user of patterns, before any module is touched.
        object.__setattr__(self, "regex", _compile(self.text))

    def matches(self, name: str) -> bool:
        """Whether ``name`` (a canonical dotted path) is selected by this pattern."""
        if self.regex is None:
            return name == self.text or name.endswith("." + self.text)
        return any(self.regex.fullmatch(suffix) for suffix in dot_suffixes(name))

    def matches_within(self, name: str) -> bool:
        """Whether ``name`` or one of its ancestors is selected (subtree semantics)."""
        return any(self.matches(prefix) for prefix in dot_prefixes(name))


def _compile(text: str) -> re.Pattern[str] | None:
    if not text.startswith(REGEX_PREFIX):
        return None
    expression = text[len(REGEX_PREFIX):]
    try:
        return re.compile(expression)
    except re.error as err:
        raise AddressingError(
            f"Module pattern {text!r} is not a valid regular expression: {err} in "
            f"{expression!r}. Fix the regex, or escape the characters meant literally "
            f"(re.escape); without the {REGEX_PREFIX!r} prefix a pattern is a plain dotted name."
        ) from err


def dot_suffixes(name: str) -> Iterator[str]:
    """``"a.b.c"`` -> ``"a.b.c"``, ``"b.c"``, ``"c"``."""
    parts = name.split(".")
    for start in range(len(parts)):
        yield ".".join(parts[start:])


def dot_prefixes(name: str) -> Iterator[str]:
    """``"a.b.c"`` -> ``"a"``, ``"a.b"``, ``"a.b.c"``."""
    parts = name.split(".")
    for end in range(1, len(parts) + 1):
        yield ".".join(parts[:end])


def parse_patterns(patterns: Iterable[str] | str | None) -> list[Pattern]:
    """Parse user patterns; a lone string is one pattern, not a sequence of characters."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    return [Pattern(str(p)) for p in patterns]


def canonical_name(name: str, strip_root_module: bool = False) -> str:
    """Drop wrapper segments from a dotted name (see the module docstring)."""
    parts = [p for p in name.split(".") if p and p not in WRAPPER_SEGMENTS]
    if strip_root_module and parts[:1] == ["module"]:
        parts = parts[1:]
    return ".".join(parts)


def _root_is_wrapper(root: nn.Module) -> bool:
    children = list(root._modules)
    return children == ["module"]


def walk_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``root.named_modules()`` (pre-order, shared modules once), without the recursive generators
    that make it slow on models with thousands of modules."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        prefix = f"{name}." if name else ""
        stack.extend((prefix + child_name, child) for child_name, child in reversed(module._modules.items())
                     if child is not None)


def canonical_modules(root: nn.Module) -> dict[str, nn.Module]:
    """Every submodule of ``root`` (root included, as ``""``) by canonical name."""
    strip = _root_is_wrapper(root)
    found: dict[str, nn.Module] = {}
    for name, module in walk_modules(root):
        found.setdefault(canonical_name(name, strip), module)
    return found


def canonical_parameters(root: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of ``root`` by canonical name (shared parameters listed once)."""
    strip = _root_is_wrapper(root)
    return {canonical_name(n, strip): p for n, p in root.named_parameters()}
