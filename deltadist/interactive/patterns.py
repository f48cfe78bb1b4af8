"""Few, short ``modified_modules`` patterns that select exactly a chosen set of modules.

What the picker page returns: the user ticks modules, and gets the patterns they would have typed.
Candidates are each chosen name's dot-suffixes (``q_proj``, ``self_attn.q_proj``, ...) and, for names
with integer segments (layer indices), ``[r]`` patterns that spell the other segments and allow
the chosen indices (``[r][0-5]\\.self_attn\\.q_proj``). A candidate is kept only if it selects nothing
outside the choice; a greedy cover takes the one covering most of what is left (the shorter on
ties), and ``[r]`` patterns that differ only in their last segment are joined
(``[r][0-5]\\.self_attn\\.(?:q_proj|v_proj)``). The result is checked with
:class:`~deltadist.addressing.names.Pattern`, the matcher of typed patterns.
"""

from __future__ import annotations

import heapq
import itertools
import re
from typing import Collection, Iterable

from deltadist.addressing.names import REGEX_PREFIX, dot_suffixes, parse_patterns
from deltadist.errors import AddressingError

MAX_INDEX_POSITIONS = 3
"""Regex candidates vary at most this many integer segments of a name at once (layer, expert...)."""


def shortest_patterns(chosen: Collection[str], universe: Iterable[str]) -> list[str]:
    """Patterns whose plain (not subtree) matches among ``universe`` are exactly ``chosen``.

    Args:
        chosen: canonical module names to select.
        universe: every name the patterns are matched against (all modules of the backbone that
            may be sites, including ones the page does not show).

    Returns:
        The patterns, ordered by the first module each selects.

    Raises:
        AddressingError: nothing is chosen, a chosen name is not in ``universe``, or a chosen name
            cannot be selected alone (``a.b`` when ``x.a.b`` exists and is not chosen: every pattern
            matching ``a.b`` matches ``x.a.b`` too).
    """
    order = {name: i for i, name in enumerate(dict.fromkeys(universe))}
    target = frozenset(chosen)
    _check_choice(target, order)
    index = _Candidates(order, target)
    candidates: dict[str, frozenset[str]] = {}
    for name in sorted(target, key=order.__getitem__):
        text, hits = index.shortest_plain(name)
        candidates[text] = hits
        candidates.update(index.index_regexes(name))
    picked = _drop_redundant(_greedy_cover(candidates, target), candidates)
    picked = _join_last_segments(picked, candidates, index.regex_ends, order)
    patterns = sorted(picked, key=lambda text: min(order[n] for n in candidates[text]))
    selected = {n for n in order if any(p.matches(n) for p in parse_patterns(patterns))}
    if selected != target:  # a bug here, never bad input: the candidates were matched exactly
        raise RuntimeError(f"shortest_patterns produced {patterns}, which select {len(selected)} "
                           f"modules instead of the {len(target)} chosen. Please report this.")
    return patterns


def _check_choice(target: frozenset[str], order: dict[str, int]) -> None:
    if not target:
        raise AddressingError("No module is selected. Select at least one module, then submit.")
    unknown = sorted(target - order.keys())
    if unknown:
        raise AddressingError(
            f"These names are not modules that can be modified: {', '.join(unknown[:5])}. Select "
            "modules of the backbone (not delta modules or their insides)."
        )


class _Candidates:
    """The candidate patterns for names of ``target``, matched through an index of every dot-suffix
    of every name (suffix -> the names ending with it)."""

    def __init__(self, order: dict[str, int], target: frozenset[str]) -> None:
        self.target = target
        self.chosen_parts: dict[int, list[list[str]]] = {}
        for name in target:
            parts = name.split(".")
            self.chosen_parts.setdefault(len(parts), []).append(parts)
        self.names: dict[str, set[str]] = {}
        for name in order:
            for suffix in dot_suffixes(name):
                self.names.setdefault(suffix, set()).add(name)
        self.by_length: dict[int, list[str]] = {}
        for suffix in self.names:
            self.by_length.setdefault(suffix.count(".") + 1, []).append(suffix)
        self._regex_hits: dict[str, frozenset[str]] = {}
        self.regex_ends: dict[str, tuple[str, str]] = {}
        """``[r]`` candidate ending in a plain segment -> (its text before that segment, the segment)."""
        self._indices: dict[tuple[str | None, ...], dict[int, set[str]]] = {}

    def shortest_plain(self, name: str) -> tuple[str, frozenset[str]]:
        """The shortest suffix of ``name`` selecting only chosen names (it selects the most of them:
        a longer suffix selects a subset of what a shorter one does)."""
        for suffix in reversed(list(dot_suffixes(name))):
            hits = self.names[suffix]
            if hits <= self.target:
                return suffix, frozenset(hits)
        outside = sorted(self.names[name] - self.target)
        raise AddressingError(
            f"{name!r} cannot be selected without {', '.join(outside[:3])}: patterns match name "
            f"endings, and {outside[0]!r} ends with {name!r}. Select it as well, or leave {name!r} out."
        )

    def index_regexes(self, name: str) -> Iterable[tuple[str, frozenset[str]]]:
        """``[r]`` patterns for ``name`` with some integer segments widened to the chosen indices
        found there (the shortest dot-suffix that selects only chosen names, if any)."""
        parts = name.split(".")
        numeric = [i for i, part in enumerate(parts) if part.isdigit()][-MAX_INDEX_POSITIONS:]
        for size in range(1, len(numeric) + 1):
            for positions in itertools.combinations(numeric, size):
                classes = self._chosen_indices(parts, positions)
                if all(len(values) == 1 for values in classes.values()):
                    continue  # the plain suffixes already cover a single index
                found = self._regex_for(parts, classes)
                if found is not None:
                    yield found

    def _chosen_indices(self, parts: list[str], positions: tuple[int, ...]) -> dict[int, set[str]]:
        """For each position, the indices there among chosen names equal to ``parts`` elsewhere."""
        key = tuple(None if i in positions else p for i, p in enumerate(parts))
        if key not in self._indices:  # shared by every name of the same column
            classes: dict[int, set[str]] = {i: set() for i in positions}
            for other in self.chosen_parts[len(parts)]:
                if all(o.isdigit() if k is None else o == k for o, k in zip(other, key)):
                    for i in positions:
                        classes[i].add(other[i])
            self._indices[key] = classes
        return self._indices[key]

    def _regex_for(self, parts: list[str], classes: dict[int, set[str]]) -> tuple[str, frozenset[str]] | None:
        # Start at the first widened segment and add context to the left until only chosen names match.
        segments = [_digit_alternatives(classes[i]) if i in classes else re.escape(part)
                    for i, part in enumerate(parts)]
        for start in range(min(classes), -1, -1):
            text = REGEX_PREFIX + r"\.".join(segments[start:])
            hits = self._regex_hits.get(text)
            if hits is None:
                hits = self._regex_hits[text] = self._match(text, len(parts) - start)
            if hits <= self.target:
                if len(parts) - 1 not in classes:
                    self.regex_ends[text] = (text[:-len(segments[-1])], parts[-1])
                return text, hits
        return None

    def _match(self, text: str, length: int) -> frozenset[str]:
        # The regex has no unescaped dot outside its segments, so it can only fullmatch suffixes of
        # exactly ``length`` segments: test those instead of every suffix of every name.
        regex = re.compile(text[len(REGEX_PREFIX):])
        suffixes = self.by_length.get(length, ())
        return frozenset(n for s in suffixes if regex.fullmatch(s) for n in self.names[s])


def _digit_alternatives(values: set[str]) -> str:
    """A regex matching exactly the digit strings ``values``: ``{"0",...,"15"}`` -> ``(?:[0-9]|1[0-5])``."""
    by_head: dict[str, set[str]] = {}
    for value in values:
        by_head.setdefault(value[:-1], set()).add(value[-1])
    # Heads with one more digit and the same last digits merge: 10-79 -> [1-7][0-9].
    merged: dict[tuple[str, int, frozenset[str]], set[str]] = {}
    for head, lasts in by_head.items():
        key = (head[:-1], len(head), frozenset(lasts))
        merged.setdefault(key, set()).add(head[-1:])
    alternatives = sorted(
        (int(stem + min(heads) + min(lasts)), stem + _char_class(heads) + _char_class(set(lasts)))
        for (stem, _, lasts), heads in merged.items()
    )
    texts = [text for _, text in alternatives]
    return texts[0] if len(texts) == 1 else "(?:" + "|".join(texts) + ")"


def _char_class(chars: set[str]) -> str:
    """``{"0","1","2","5"}`` -> ``[0-25]``; one character is itself; ``{""}`` (no head) is empty."""
    if chars == {""}:
        return ""
    digits = sorted(int(c) for c in chars)
    if len(digits) == 1:
        return str(digits[0])
    runs: list[list[int]] = []
    for digit in digits:
        if runs and digit == runs[-1][-1] + 1:
            runs[-1].append(digit)
        else:
            runs.append([digit])
    body = "".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else "".join(map(str, r)) for r in runs)
    return f"[{body}]"


def _greedy_cover(candidates: dict[str, frozenset[str]], target: frozenset[str]) -> list[str]:
    """Candidates covering ``target``: each step the one covering the most uncovered names, then
    the shortest (a lazy heap: a candidate's gain only falls, so a popped gain still current wins)."""
    heap = [(-len(hits), len(text), text) for text, hits in candidates.items()]
    heapq.heapify(heap)
    uncovered = set(target)
    picked: list[str] = []
    while uncovered:
        _, length, text = heapq.heappop(heap)
        gain = len(candidates[text] & uncovered)
        if gain == 0:
            continue
        if heap and (-gain, length, text) > heap[0]:
            heapq.heappush(heap, (-gain, length, text))
            continue
        picked.append(text)
        uncovered -= candidates[text]
    return picked


def _join_last_segments(picked: list[str], candidates: dict[str, frozenset[str]],
                        ends: dict[str, tuple[str, str]], order: dict[str, int]) -> list[str]:
    """``[r]`` picks equal up to their last segment, joined into one (``...\\.(?:q_proj|v_proj)``):
    the same modules with fewer patterns. ``candidates`` gets the joined ones."""
    groups: dict[str, list[str]] = {}
    for text in picked:
        if text in ends:
            groups.setdefault(ends[text][0], []).append(text)
    joined = [text for text in picked if text not in ends]
    for head, texts in groups.items():
        if len(texts) == 1:
            joined.append(texts[0])
            continue
        texts.sort(key=lambda t: min(order[n] for n in candidates[t]))
        text = head + "(?:" + "|".join(re.escape(ends[t][1]) for t in texts) + ")"
        candidates[text] = frozenset().union(*(candidates[t] for t in texts))
        joined.append(text)
    return joined


def _drop_redundant(picked: list[str], candidates: dict[str, frozenset[str]]) -> list[str]:
    """Leave out picks whose names the other picks select anyway (late picks can cover early ones)."""
    kept = list(picked)
    for text in reversed(picked):
        others = set().union(*(candidates[t] for t in kept if t != text))
        if candidates[text] <= others:
            kept.remove(text)
    return kept
