"""Hooks find their per-call state on the delta module: a copy, a pickle and a compiled graph
of a model with deltas behave as the model does, and a copy made inside a mixed batch is not
routed by it."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import deltadist
from deltadist import AutoDeltaConfig, AutoDeltaModel
from tests.tiny import METHODS, build_tiny, logits_of, tiny_inputs

TOL = {"rtol": 1e-5, "atol": 1e-6}
ROUTED_METHODS = ("lora", "adapter", "parallel_adapter", "prefix")
"""Methods mixed_batch routes by rows; parallel_adapter's default is a span (ff.w1 to ff.w2)."""


def _tuned(model: torch.nn.Module, method: str, seed: int) -> deltadist.DeltaBase:
    """A delta of ``method`` on ``model`` whose every parameter is moved off its initial value."""
    config = AutoDeltaConfig.from_dict({**METHODS[method], "unfrozen_modules": ["deltas"]})
    delta = AutoDeltaModel.from_config(config, backbone_model=model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in delta.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return delta


@pytest.mark.parametrize("method", ROUTED_METHODS)
def test_a_copy_made_inside_a_mixed_batch_is_not_routed_by_it(method: str) -> None:
    model = build_tiny("llama", "lm")
    first, _ = _tuned(model, method, 1), _tuned(model, method, 2)
    inputs = tiny_inputs("llama", batch=2)
    with torch.no_grad():
        both = logits_of(model, inputs)  # outside a block: every delta on every row
        with deltadist.mixed_batch([first, None]):
            twin = copy.deepcopy(model)
            routed = logits_of(model, inputs)
            unrouted = logits_of(twin, inputs)
    torch.testing.assert_close(unrouted, both, **TOL)
    assert not torch.allclose(routed, both)  # the original is routed inside the block


@pytest.mark.parametrize("method", [*ROUTED_METHODS, "soft_prompt", "compacter"])
def test_a_model_with_a_delta_pickles_and_deep_copies(method: str) -> None:
    model = build_tiny("llama", "lm")
    _tuned(model, method, 1)
    inputs = tiny_inputs("llama", batch=2)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        expected = logits_of(model, inputs)
        torch.testing.assert_close(logits_of(loaded, inputs), expected, **TOL)
        torch.testing.assert_close(logits_of(copy.deepcopy(model), inputs), expected, **TOL)


def test_a_compiled_model_runs_each_layers_own_prefix() -> None:
    """Each attention reads its own prefix from its own children: a graph does not reuse one
    layer's for the others (it did while prefixes were looked up in a registry)."""
    torch._dynamo.reset()
    model = build_tiny("llama", "lm")
    _tuned(model, "prefix", 1)
    inputs = tiny_inputs("llama", batch=2)
    # One graph, no break, checked on the torch this was measured on (2.13); the oldest declared
    # torch (2.9) is held to the same outputs, graph breaks allowed.
    fullgraph = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)
    fast = torch.compile(model, backend="eager", fullgraph=fullgraph)
    with torch.no_grad():
        torch.testing.assert_close(fast(**inputs).logits, logits_of(model, inputs), rtol=1e-4, atol=1e-5)
