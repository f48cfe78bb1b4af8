"""A model with deltas is freed when the user drops it: deltadist's bookkeeping beside the modules
(attachments, hook handles, prefix routes) holds nothing that keeps it alive."""

from __future__ import annotations

import gc
import weakref

import pytest

from deltadist import AutoDeltaModel
from tests.tiny import METHODS, build_tiny


@pytest.mark.parametrize("method", list(METHODS))
def test_a_dropped_model_with_a_delta_is_freed(method: str) -> None:
    model = build_tiny("llama", "lm")
    delta = AutoDeltaModel.from_config(METHODS[method], backbone_model=model)
    delta.freeze_module()
    gone = weakref.ref(model)
    del model, delta
    gc.collect()
    assert gone() is None, f"a {method} delta kept its dropped model alive"
