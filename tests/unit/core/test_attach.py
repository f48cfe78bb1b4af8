"""Mechanisms and composition: hook order on one site, detach/attach in any order, deepcopy."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from deltadist import BitFitModel, LoraModel
from deltadist.core.attach import Attachment, attach, detach, forget
from deltadist.core.delta_module import DeltaModule
from deltadist.core.mechanism import Mechanism
from deltadist.mechanisms.hooks import AFTER, BEFORE, PARALLEL
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import TwoLayer


class Affine(DeltaModule):
    """``x * scale + shift``: two of these do not commute, so the order is observable."""

    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def reset_parameters(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _site() -> nn.Linear:
    site = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        site.weight.fill_(1.0)
    return site


def _attachment(site: nn.Module, delta: DeltaModule, mechanism: Mechanism) -> Attachment:
    return Attachment(site=site, site_name="site", delta=delta, base_name="affine", mechanism=mechanism)


def test_after_deltas_run_in_insertion_order() -> None:
    site = _site()
    first = _attachment(site, Affine(2, 0), AFTER)
    second = _attachment(site, Affine(1, 1), AFTER)
    attach(first), attach(second)
    assert site(torch.tensor([1.0])).item() == 3.0  # (1*2)+1, not (1+1)*2
    assert [first.child_name, second.child_name] == ["affine", "affine_1"]


def test_before_deltas_last_added_sees_the_input_first() -> None:
    site = _site()
    first = _attachment(site, Affine(2, 0), BEFORE)
    second = _attachment(site, Affine(1, 1), BEFORE)
    attach(first), attach(second)
    assert site(torch.tensor([1.0])).item() == 4.0  # second first: (1+1), then first: *2


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_detach_and_reattach_in_any_order_restores_the_composition(order) -> None:
    site = _site()
    atts = [
        _attachment(site, Affine(2, 0), AFTER),
        _attachment(site, Affine(1, 1), PARALLEL),
        _attachment(site, Affine(3, -1), AFTER),
    ]
    before = snapshot(site)
    for att in atts:
        attach(att)
    x = torch.tensor([0.5])
    composed = site(x).item()
    for i in order:
        detach(atts[i])
    assert_same_snapshot(before, snapshot(site))
    for i in order:
        attach(atts[i])
    assert site(x).item() == composed


def test_forget_drops_the_record() -> None:
    site = _site()
    att = _attachment(site, Affine(2, 0), AFTER)
    attach(att)
    forget(att)
    assert not site._forward_hooks and "affine" not in site._modules


def _tune(delta) -> None:
    """Move the delta's own parameters away from their no-op start (the task head stays)."""
    with torch.no_grad():
        for param in delta.delta_parameters().values():
            param.normal_(0, 0.5)


def test_two_deltas_on_one_site_compose_and_detach_independently() -> None:
    model, x = TwoLayer(), torch.randn(5, 4)
    base = model(x)
    lora = LoraModel(model, modified_modules=["fc1", "fc2"], lora_r=2)
    _tune(lora)
    lora_only = model(x)
    bitfit = BitFitModel(model, modified_modules=["fc2"])
    _tune(bitfit)
    both = model(x)
    assert not torch.allclose(both, lora_only)
    lora.detach()
    bitfit_only = model(x)
    bitfit.detach()
    assert torch.equal(model(x), base)
    lora.attach()
    assert torch.equal(model(x), lora_only)
    bitfit.attach()
    assert torch.equal(model(x), both)
    lora.detach()
    assert torch.equal(model(x), bitfit_only)


def test_second_lora_on_the_same_site_gets_its_own_child_name() -> None:
    model = TwoLayer()
    LoraModel(model, modified_modules=["fc1"], lora_r=2)
    LoraModel(model, modified_modules=["fc1"], lora_r=3)
    assert model.fc1.lora.lora_A.shape == (2, 4)
    assert model.fc1.lora_1.lora_A.shape == (3, 4)


def test_deepcopy_runs_its_own_delta_copy() -> None:
    model, x = TwoLayer(), torch.randn(2, 4)
    delta = LoraModel(model, modified_modules=["fc1"], lora_r=2)
    _tune(delta)
    twin = copy.deepcopy(model)
    assert torch.equal(twin(x), model(x))
    with torch.no_grad():
        twin.fc1.lora.lora_B.zero_()
    assert not torch.equal(twin(x), model(x))


def test_keyword_only_hidden_states_reach_the_delta() -> None:
    model = TwoLayer()
    delta = LoraModel(model, modified_modules=["fc1"], lora_r=2)
    _tune(delta)
    x = torch.randn(2, 4)
    assert torch.equal(model.fc1(input=x), model.fc1(x))


def test_bitfit_gradient_equals_the_existing_bias_gradient() -> None:
    """Training the added offset follows the same path as unfreezing the bias itself."""
    model, x = TwoLayer(), torch.randn(5, 4)
    model(x).pow(2).sum().backward()
    bias_grad = model.fc2.bias.grad.clone()
    model.zero_grad()
    BitFitModel(model, modified_modules=["fc2"]).freeze_module()
    model(x).pow(2).sum().backward()
    torch.testing.assert_close(model.fc2.bitfit.bias.grad, bias_grad)


def test_every_method_composes_on_one_site_in_insertion_order_whatever_the_detach_order() -> None:
    from deltadist import AdapterModel, CompacterModel, LowRankAdapterModel, ParallelAdapterModel

    model, x = TwoLayer((4, 16, 3)), torch.randn(5, 4)
    kinds = [(LoraModel, {"lora_r": 2}), (BitFitModel, {}), (AdapterModel, {"bottleneck_dim": 4}),
             (LowRankAdapterModel, {"reduction_factor": 4}), (CompacterModel, {"reduction_factor": 4}),
             (ParallelAdapterModel, {"bottleneck_dim": 4})]
    deltas = [cls(model, modified_modules=["fc1"], **kwargs) for cls, kwargs in kinds]
    for delta in deltas:
        _tune(delta)
    # By hand: parallel deltas read fc1's input and add at their place; sequential ones transform
    # the output; all in insertion order.
    site = model.fc1
    y = torch.nn.functional.linear(x, site.weight, site.bias) + site.lora(x)
    y = site.compacter(site.low_rank_adapter(site.adapter(site.bitfit(y))))
    expected = model.fc2(torch.relu(y + site.parallel_adapter(x)))
    torch.testing.assert_close(model(x), expected)
    for order in [(0, 1, 2, 3, 4, 5), (5, 4, 3, 2, 1, 0), (2, 5, 0, 3, 1, 4), (3, 0, 4, 1, 5, 2)]:
        for i in order:
            deltas[i].detach()
        for i in reversed(order):
            deltas[i].attach()
        torch.testing.assert_close(model(x), expected)
