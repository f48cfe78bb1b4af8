"""JSON from outside (checkpoint headers, config files, the picker's requests), parsed with a depth limit.

Python's ``json`` parser recurses once per level of nesting, so a document nested 100,000 levels
deep raises a bare ``RecursionError``. What deltadist reads nests a few levels at most; anything
deeper than :data:`MAX_JSON_DEPTH` is refused as a :class:`JSONTooDeepError` (a ``ValueError``,
like any other unreadable JSON) before the parser sees it.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

MAX_JSON_DEPTH = 100
"""Deepest nesting of arrays and objects accepted (deltadist's own files nest 3 levels)."""

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
for _open, _close in (b"[]", b"{}"):
    _STEP[_open], _STEP[_close] = 1, -1


class JSONTooDeepError(ValueError):
    """JSON text nested deeper than :data:`MAX_JSON_DEPTH`."""


def json_depth(text: str | bytes, at_most: int | None = None) -> int:
    """How deep arrays and objects nest in ``text`` (brackets inside strings do not count).

    With ``at_most``, text with no more than that many opening brackets answers their number
    (a bound of the depth) without counting further.
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    opening = brackets.count(b"[") + brackets.count(b"{")
    if at_most is not None and opening <= at_most:
        return opening
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def loads(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)``, refusing text nested deeper than ``max_depth``.

    Raises:
        JSONTooDeepError: nested too deeply (also where the parser itself ran out of stack).
        ValueError: not JSON (``json.JSONDecodeError``, ``UnicodeDecodeError``).
    """
    depth = json_depth(text, at_most=max_depth)
    if depth > max_depth:
        raise JSONTooDeepError(f"JSON nested {depth} levels deep (at most {max_depth} are read)")
    try:
        return json.loads(text)
    except RecursionError as err:
        raise JSONTooDeepError(f"JSON nested too deeply to parse (at most {max_depth} levels are "
                               "read)") from err
