"""torch.compile: attach, detach, merge, unmerge and disabled() take effect on the next call."""

from __future__ import annotations

import pytest
import torch

from deltadist import BitFitModel, LoraModel
from tests.tiny import TwoLayer

TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture
def compiled():
    """A model compiled *before* any delta exists (the harder case), its eager twin and an input."""
    torch._dynamo.reset()
    model = TwoLayer((8, 16, 4))
    fast = torch.compile(model, backend="eager")  # Dynamo's graph capture; no C++ compiler needed
    x = torch.randn(3, 8)
    assert torch.equal(fast(x), model(x))  # compiled and cached without hooks
    return model, fast, x


def _tune(delta) -> None:
    with torch.no_grad():
        for param in delta.parameters():
            param.normal_(0, 0.5)


def test_attach_detach_and_reattach_reach_the_compiled_model(compiled) -> None:
    model, fast, x = compiled
    base = model(x)
    delta = LoraModel(model, modified_modules=["fc1"], lora_r=2)
    _tune(delta)
    tuned = model(x)
    assert not torch.allclose(tuned, base)
    torch.testing.assert_close(fast(x), tuned, **TOL)
    delta.detach()
    torch.testing.assert_close(fast(x), base, **TOL)
    delta.attach()  # the re-attach that used to keep running the base graph
    torch.testing.assert_close(fast(x), tuned, **TOL)


def test_merge_unmerge_and_disabled_reach_the_compiled_model(compiled) -> None:
    model, fast, x = compiled
    base = model(x)
    lora = LoraModel(model, modified_modules=["fc1", "fc2"], lora_r=2)
    bitfit = BitFitModel(model, modified_modules=["fc2"])
    _tune(lora), _tune(bitfit)
    both = model(x)
    torch.testing.assert_close(fast(x), both, **TOL)
    with lora.disabled():
        only_bitfit = model(x)
        torch.testing.assert_close(fast(x), only_bitfit, **TOL)
        with bitfit.disabled():
            torch.testing.assert_close(fast(x), base, **TOL)
    torch.testing.assert_close(fast(x), both, **TOL)
    lora.merge()
    torch.testing.assert_close(fast(x), both, **TOL)
    lora.unmerge()
    torch.testing.assert_close(fast(x), both, **TOL)
    bitfit.detach()
    lora.detach()
    torch.testing.assert_close(fast(x), base, **TOL)
