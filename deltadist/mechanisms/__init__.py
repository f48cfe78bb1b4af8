"""How a delta changes a call, with hooks only: output hooks (parallel, after, before, span),
input rewriting (soft prompts), attention routing (prefixes) and row routing (mixed batches)."""

from deltadist.core.mechanism import HOLDER, Mechanism
from deltadist.mechanisms.attention import KEY_VALUE_PREFIX
from deltadist.mechanisms.hooks import AFTER, BEFORE, PARALLEL, SPAN

__all__ = ["AFTER", "BEFORE", "HOLDER", "KEY_VALUE_PREFIX", "PARALLEL", "SPAN", "Mechanism"]
