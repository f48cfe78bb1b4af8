"""Activation checkpointing gives every delta of every method its gradients, unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch

from deltadist import AutoDeltaModel
from tests.tiny import METHODS, build_tiny, logits_of, skip_unsupported, tiny_inputs

CASES = [(family, method) for family in ("bert", "llama") for method in METHODS]


def _gradients(family: str, method: str | dict, reentrant: bool | None) -> dict[str, torch.Tensor | None]:
    """The gradients of every delta parameter of ``method`` (a name in METHODS, or a config)."""
    model = build_tiny(family, "cls")
    config = METHODS[method] if isinstance(method, str) else method
    with torch.random.fork_rng(devices=[]):  # the same initial delta in both runs
        torch.manual_seed(4)
        delta = AutoDeltaModel.from_config(config, backbone_model=model)
        with torch.no_grad():  # off the no-op start, so every parameter has a gradient
            for param in delta.delta_parameters().values():
                param.add_(torch.randn(param.shape) * 0.1)
    delta.freeze_module()
    model.train()  # transformers only checkpoints in training mode
    if reentrant is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()  # what transformers 5 does; 4.57 needs it by hand
    logits_of(model, tiny_inputs(family)).pow(2).mean().backward()
    return {key: None if p.grad is None else p.grad.clone() for key, p in delta.named_parameters()}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize(("family", "method"), CASES)
def test_checkpointing_gives_every_delta_parameter_its_gradient(family, method, reentrant) -> None:
    skip_unsupported(family, method)
    expected = _gradients(family, method, reentrant=None)
    got = _gradients(family, method, reentrant)
    assert got.keys() == expected.keys()
    for key, grad in expected.items():
        assert got[key] is not None, key
        torch.testing.assert_close(got[key], grad, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
