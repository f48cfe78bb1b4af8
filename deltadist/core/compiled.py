"""Keeping ``torch.compile`` graphs in step with attach / detach / merge.

By default Dynamo does not guard on a module's forward hooks
(``torch._dynamo.config.skip_nnmodule_hook_guards = True``, documented there as unsafe: "if you
... add or remove hooks, dynamo will not notice"). Deltas are wired in with hooks, so a compiled
model kept running whichever composition it was first compiled with: re-attaching a detached LoRA
changed nothing in the compiled model's logits.

The fix is to let Dynamo guard on hooks (then a change recompiles once, and a later change back
finds the cached graph), and to drop graphs compiled before that setting took effect, once. Nothing
happens unless Dynamo has been imported, so ``import deltadist`` and models that are never compiled
pay nothing.
"""

from __future__ import annotations

import sys


def refresh_compiled_graphs() -> None:
    """Make compiled graphs notice that a module's hooks changed (call after every re-wiring)."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return  # nothing was compiled in this process
    config = dynamo.config
    if config.skip_nnmodule_hook_guards:
        # Graphs compiled so far carry no hook guards and would keep running the old
        # composition: drop them (one global reset, the first time only). Graphs compiled from
        # now on guard on hooks, so attach/detach just selects or builds the right graph.
        config.skip_nnmodule_hook_guards = False
        dynamo.reset()
