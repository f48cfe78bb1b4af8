"""Each delta's own copy of the task head: detach restores the backbone's head bit for bit, two
deltas each have a head, mixed batches route rows through their delta's head, and saving, loading,
merging, freezing, deepcopy, pickling and compiling carry the copy."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from torch import nn

import deltadist
from deltadist import AutoDeltaModel, LoraModel
from deltadist.errors import DeltaError, SiteError
from tests.fixtures.make_pre_rebuild import HERE
from tests.mixed_rows import alone, assert_rows_as_alone
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import build_tiny, logits_of, tiny_inputs

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _task(model: nn.Module, seed: int) -> LoraModel:
    """A LoRA with its own (default) classifier copy, both moved off their first values."""
    delta = LoraModel(model, lora_r=2, modified_modules=["query", "value"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in delta.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return delta


def test_detach_restores_the_backbones_head_bit_for_bit_after_training() -> None:
    model = build_tiny("bert", "cls")
    before, state = snapshot(model), {k: v.clone() for k, v in model.state_dict().items()}
    delta = LoraModel(model, lora_r=2)
    delta.freeze_module()
    optimizer = torch.optim.SGD(delta.parameters(), lr=1.0)
    logits_of(model, tiny_inputs("bert")).pow(2).sum().backward()
    optimizer.step()
    trained = model.classifier.copy.module.weight.detach().clone()
    assert not torch.equal(trained, state["classifier.weight"])  # the copy trained
    delta.detach()
    assert_same_snapshot(before, snapshot(model))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    delta.attach()  # the trained copy serves again
    assert torch.equal(model.classifier.copy.module.weight, trained)


def test_two_deltas_each_have_their_own_head_the_newest_serves() -> None:
    model = build_tiny("bert", "cls")
    inputs = tiny_inputs("bert")
    first = _task(model, 1)
    second = _task(model, 2)
    assert first.unfrozen_backbone_parameters()["classifier.weight"] is not \
        second.unfrozen_backbone_parameters()["classifier.weight"]
    both = logits_of(model, inputs)
    alone([first, second], second)
    second_alone = logits_of(model, inputs)
    first.attach()  # attached last: its head serves, the other waits (its LoRA still composes)
    with second.disabled():
        first_alone = logits_of(model, inputs)
    assert not torch.allclose(both, second_alone)  # first's LoRA still runs under second's head
    second.detach()
    torch.testing.assert_close(logits_of(model, inputs), first_alone, **TOL)


def test_a_mixed_batch_routes_each_row_through_its_deltas_head_forward_and_backward() -> None:
    model = build_tiny("bert", "cls")
    first, second = _task(model, 1), _task(model, 2)
    rows = [first, second, None, second]
    # training both in one batch equals training each alone
    assert_rows_as_alone(model, [first, second], rows, tiny_inputs("bert", batch=len(rows)), **TOL)


def test_heads_of_different_widths_in_one_mixed_batch_are_refused() -> None:
    model = build_tiny("bert", "cls")
    first = _task(model, 1)
    second = LoraModel(model, lora_r=2, modified_modules=["query"], unfrozen_modules=["deltas", "classifier"])
    wide = nn.Linear(model.classifier.in_features, 5)  # a task with five labels
    second.record.attachments[-1].delta.module = wide
    inputs = tiny_inputs("bert", batch=2)
    with pytest.raises(DeltaError, match="heads of one width"), deltadist.mixed_batch([first, second]):
        logits_of(model, inputs)


def test_save_load_and_merge_carry_the_copy(tmp_path: Path) -> None:
    model = build_tiny("bert", "cls")
    inputs = tiny_inputs("bert")
    delta = _task(model, 1)
    tuned = logits_of(model, inputs)
    delta.save_finetuned(tmp_path / "delta")
    fresh = build_tiny("bert", "cls")
    original_head = fresh.classifier.weight.detach().clone()
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=fresh)
    torch.testing.assert_close(logits_of(fresh, inputs), tuned, **TOL)
    assert torch.equal(fresh.classifier.weight, original_head)  # loaded onto the copy
    with torch.no_grad():
        loaded.merge()  # the copy's values go into the backbone's head ...
        baked = loaded.unfrozen_backbone_parameters()["classifier.weight"]
        assert torch.equal(fresh.classifier.weight, baked)
        torch.testing.assert_close(logits_of(fresh, inputs), tuned, **TOL)
        loaded.unmerge()  # ... and the original comes back
        assert torch.equal(fresh.classifier.weight, original_head)
        plain = loaded.merge_and_unload()
    assert not any(".copy." in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits_of(plain, inputs), tuned, **TOL)


def test_files_with_the_head_under_the_backbones_name_load_onto_a_copy() -> None:
    """Written before copies existed (``tests/fixtures/pre_rebuild``): ``classifier.weight`` then
    named the backbone's own head."""
    model = build_tiny("distilbert", "cls")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    delta = AutoDeltaModel.from_finetuned(str(Path(HERE) / "parallel_adapter"), backbone_model=model)
    saved = delta.unfrozen_backbone_parameters()
    assert saved["classifier.weight"] is model.classifier.copy.module.weight
    assert not torch.equal(saved["classifier.weight"], before["classifier.weight"])
    delta.detach()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_module_served_by_another_deltas_copy_cannot_be_modified() -> None:
    model = build_tiny("bert", "cls")
    _task(model, 1)
    before = snapshot(model)
    with pytest.raises(SiteError, match="own copy of this module"):
        LoraModel(model, lora_r=2, modified_modules=["classifier"], unfrozen_modules=["deltas"])
    assert_same_snapshot(before, snapshot(model))


def test_freeze_module_exclude_adds_and_drops_copies() -> None:
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, lora_r=2, unfrozen_modules=["deltas"])
    assert "copy" not in model.classifier._modules
    delta.freeze_module(exclude=["deltas", "classifier"])
    assert model.classifier.copy.module.weight.requires_grad and not model.classifier.weight.requires_grad
    delta.freeze_module(exclude=["deltas"])
    assert "copy" not in model.classifier._modules
    assert "classifier.weight" not in dict(delta.named_parameters())


def test_memory_is_one_head_per_delta() -> None:
    model = build_tiny("t5", "cls")
    first = LoraModel(model, lora_r=2)
    second = LoraModel(model, lora_r=2)
    head = model.classification_head
    own = sum(p.numel() for n, p in head.named_parameters() if not n.startswith("copy"))
    copies = [m for m in model.modules() if type(m).__name__ == "TrainedCopy"]
    kept = ["deltas", "classification_head"]
    assert first.config.unfrozen_modules == second.config.unfrozen_modules == kept
    assert [sum(p.numel() for p in c.parameters()) for c in copies] == [own, own]


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "compile"])
def test_a_model_with_copies_deepcopies_pickles_and_compiles(how: str) -> None:
    model = build_tiny("bert", "cls")
    first, second = _task(model, 1), _task(model, 2)
    inputs = tiny_inputs("bert", batch=2)
    expected = logits_of(model, inputs)
    with deltadist.mixed_batch([first, second]):
        routed = logits_of(model, inputs)
    if how == "deepcopy":
        other = copy.deepcopy(model)
    elif how == "pickle":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        other = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    else:
        other = torch.compile(model, backend="eager")
    torch.testing.assert_close(logits_of(other, inputs), expected, **TOL)
    if how == "compile":
        with deltadist.mixed_batch([first, second]):
            torch.testing.assert_close(logits_of(other, inputs), routed, **TOL)
    else:  # the copy's heads are its own: training them leaves the original's alone
        with torch.no_grad():
            other.classifier.copy_1.module.weight.add_(1.0)
        torch.testing.assert_close(logits_of(model, inputs), expected, **TOL)
