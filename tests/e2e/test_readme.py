"""The README's "Must try" walkthrough runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_must_try_walkthrough_runs() -> None:
    text = README.read_text()
    section = text.split("## Must try", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "from_finetuned" in code and "detach" in code
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
