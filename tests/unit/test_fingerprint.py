"""Backbone fingerprint: tells checkpoints apart, ignores deltas, dtype-stable, cheap."""

from __future__ import annotations

import torch

from deltadist import LoraModel
from deltadist.engines import detect_engine
from deltadist.fingerprint import SAMPLES_PER_TENSOR, backbone_fingerprint, sample_positions
from tests.tiny import build_tiny


def _fp(model, skip=()):
    return backbone_fingerprint(model, detect_engine(model), skip)


def test_same_checkpoint_same_fingerprint_other_checkpoint_differs() -> None:
    assert _fp(build_tiny("llama", "cls", seed=0)) == _fp(build_tiny("llama", "cls", seed=0))
    assert _fp(build_tiny("llama", "cls", seed=0)) != _fp(build_tiny("llama", "cls", seed=1))


def test_one_changed_weight_value_at_a_sampled_position_changes_it() -> None:
    model = build_tiny("bert", "cls")
    before = _fp(model)
    with torch.no_grad():
        model.classifier.weight.view(-1)[0] += 1.0
    assert _fp(model) != before


def test_attached_deltas_and_skipped_names_do_not_count() -> None:
    model = build_tiny("bert", "cls")
    before = _fp(model)
    LoraModel(model, lora_r=2)
    assert _fp(model) == before
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    assert _fp(model, skip={"classifier.weight"}) == _fp(build_tiny("bert", "cls"), skip={"classifier.weight"})


def test_bf16_copy_matches_fp32_original() -> None:
    model = build_tiny("gpt2", "cls")
    assert _fp(model) == _fp(build_tiny("gpt2", "cls").to(torch.bfloat16))


def test_meta_model_has_no_fingerprint() -> None:
    with torch.device("meta"):
        model = torch.nn.Linear(4, 4)
    assert _fp(model) is None


def test_sample_positions_cover_both_ends() -> None:
    positions = sample_positions(1000)
    assert len(positions) == SAMPLES_PER_TENSOR and positions[0] == 0 and positions[-1] == 999
    assert sample_positions(3).tolist() == [0, 1, 2]
