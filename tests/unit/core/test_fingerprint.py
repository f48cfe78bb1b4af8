"""Backbone fingerprint: tells checkpoints apart and names what differs, ignores deltas, accepts
fp32/bf16/fp16 copies of one checkpoint, refuses ~1% changes, cheap to store."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

from deltadist import LoraModel
from deltadist.core.fingerprint import (
    DIGEST_DIFFERS,
    RTOL,
    SAMPLES_PER_TENSOR,
    STRUCTURE_DIFFERS,
    Fingerprint,
    backbone_fingerprint,
    parse_samples_text,
    sample_positions,
    samples_agree,
)
from deltadist.engines import detect_engine
from deltadist.errors import CheckpointError
from tests.tiny import build_tiny

FAMILIES = ("llama", "gpt2", "bert", "t5")
FP16_SMALLEST_NORMAL = 2.0**-14


def _fp(model: torch.nn.Module, skip: set[str] | frozenset[str] = frozenset()) -> Fingerprint:
    fingerprint = backbone_fingerprint(model, detect_engine(model), skip)
    assert fingerprint is not None
    return fingerprint


def _differing(stored: Fingerprint, current: Fingerprint) -> list[str]:
    """What loading a delta saved with ``stored`` onto the ``current`` backbone reports."""
    return current.differing_tensors(stored.digest, stored.samples_text)


def _nonzero_names(fingerprint: Fingerprint) -> list[str]:
    """Tensors that scaling or noise changes visibly (zero biases stay zero)."""
    values = torch.tensor(fingerprint.samples).split(list(fingerprint.counts))
    return [n for n, v in zip(fingerprint.names, values) if v.numel() and v.abs().max() > 1e-4]


def _changed(
    model: torch.nn.Module, change: Callable[[torch.Tensor], torch.Tensor]
) -> torch.nn.Module:
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(change(param))
    return model


def test_same_checkpoint_same_fingerprint_other_checkpoint_differs() -> None:
    reference = _fp(build_tiny("llama", "cls", seed=0))
    same = _fp(build_tiny("llama", "cls", seed=0))
    other = _fp(build_tiny("llama", "cls", seed=1))
    assert same == reference and _differing(reference, same) == []
    assert other.digest != reference.digest and other.structure == reference.structure
    # Every randomly initialised tensor is named; the norms (all ones in both) are not.
    assert _differing(reference, other) == [n for n in reference.names if "norm" not in n]


def test_a_changed_value_at_a_sampled_position_names_its_tensor() -> None:
    model = build_tiny("bert", "cls")
    before = _fp(model)
    key = model.bert.encoder.layer[1].attention.self.key.weight
    with torch.no_grad():
        model.classifier.weight.view(-1)[0] += 1.0
        key.view(-1)[sample_positions(key.numel())[7]] *= 1.02
    assert _fp(model).digest != before.digest
    assert _differing(before, _fp(model)) == [
        "bert.encoder.layer.1.attention.self.key.weight", "classifier.weight",
    ]


def test_attached_deltas_and_skipped_names_do_not_count() -> None:
    model = build_tiny("bert", "cls")
    before = _fp(model)
    LoraModel(model, lora_r=2)
    assert _fp(model) == before
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    skip = {"classifier.weight"}
    assert _fp(model, skip).digest == _fp(build_tiny("bert", "cls"), skip).digest
    assert "classifier.weight" not in _fp(model, skip).names


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_checkpoint_accepts_its_bf16_and_fp16_copies_both_ways(family: str) -> None:
    fp32 = _fp(build_tiny(family, "cls"))
    bf16 = _fp(build_tiny(family, "cls").to(torch.bfloat16))
    fp16 = _fp(build_tiny(family, "cls").to(torch.float16))
    # The bug this fixes: the fp16 copy's bf16-rounded digest is not the fp32 one.
    assert bf16.digest == fp32.digest and fp16.digest != fp32.digest
    for stored, current in ((fp32, bf16), (fp32, fp16), (bf16, fp16)):
        assert _differing(stored, current) == [] and _differing(current, stored) == []


def test_fp16_subnormals_and_underflow_to_zero_are_accepted() -> None:
    fp32 = _fp(_changed(build_tiny("llama", "cls"), lambda p: p * 1e-4))
    fp16 = _fp(_changed(build_tiny("llama", "cls"), lambda p: p * 1e-4).half())
    bf16 = _fp(_changed(build_tiny("llama", "cls"), lambda p: p * 1e-4).bfloat16())
    exact, half = torch.tensor(fp32.samples), torch.tensor(fp16.samples)
    # The case is exercised: most samples are fp16 subnormals and some became 0, so a relative
    # tolerance alone would refuse the fp16 copy.
    assert ((exact.abs() < FP16_SMALLEST_NORMAL) & (exact != 0)).float().mean() > 0.5
    assert ((half == 0) & (exact != 0)).any()
    assert ((half - exact).abs() > RTOL * exact.abs()).any()
    for stored, current in ((fp32, fp16), (bf16, fp16)):
        assert _differing(stored, current) == [] and _differing(current, stored) == []


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("saved_in", [torch.float32, torch.bfloat16, torch.float16])
def test_weights_scaled_by_1_01_are_refused_and_every_changed_tensor_named(
        family: str, saved_in: torch.dtype) -> None:
    stored = _fp(build_tiny(family, "cls").to(saved_in))
    current = _fp(_changed(build_tiny(family, "cls"), lambda p: p * 1.01))
    nonzero = _nonzero_names(stored)
    assert nonzero and _differing(stored, current) == nonzero


@pytest.mark.parametrize("family", FAMILIES)
def test_one_percent_relative_noise_is_refused(family: str) -> None:
    generator = torch.Generator().manual_seed(0)
    stored = _fp(build_tiny(family, "cls"))

    def noisy(param: torch.Tensor) -> torch.Tensor:
        return param * (1 + 0.01 * torch.randn(param.shape, generator=generator))

    differing = _differing(stored, _fp(_changed(build_tiny(family, "cls"), noisy)))
    nonzero = _nonzero_names(stored)
    assert set(differing) <= set(nonzero) and len(differing) >= 0.9 * len(nonzero)


def test_other_hidden_size_is_a_structure_difference() -> None:
    stored = _fp(build_tiny("llama", "cls"))
    wider = _fp(build_tiny("llama", "cls", hidden_size=64))
    assert wider.structure != stored.structure
    assert _differing(stored, wider) == [STRUCTURE_DIFFERS]


def test_digest_only_checkpoint_compares_exactly() -> None:
    stored = _fp(build_tiny("gpt2", "cls"))
    for copy, expected in ((build_tiny("gpt2", "cls").bfloat16(), []),
                           (build_tiny("gpt2", "cls").half(), [DIGEST_DIFFERS]),
                           (build_tiny("gpt2", "cls", seed=1), [DIGEST_DIFFERS])):
        assert _fp(copy).differing_tensors(stored.digest, None) == expected


def test_digest_format_is_unchanged_so_old_checkpoints_still_match() -> None:
    linear = torch.nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.1, -0.2, 0.3], [1.5, -1e-3, 2.0**-20]]))
        linear.bias.copy_(torch.tensor([0.0, -7.25]))
    # Computed by the digest-only implementation (before samples were kept).
    assert _fp(linear).digest == "91be9eecc3f6e71a52f2287f470dc6929ffa71f753048c89e04b672478e8c330"


def test_samples_text_round_trips_nan_and_inf() -> None:
    model = build_tiny("bert", "cls")
    with torch.no_grad():
        model.classifier.weight.view(-1)[0] = float("nan")
        model.classifier.weight.view(-1)[-1] = float("-inf")
    fingerprint = _fp(model)
    structure, samples = parse_samples_text(fingerprint.samples_text)
    assert structure == fingerprint.structure
    expected = torch.tensor(fingerprint.samples)
    torch.testing.assert_close(samples, expected, rtol=0, atol=0, equal_nan=True)
    # NaN and inf agree with themselves, so the same checkpoint (and its copies) is accepted.
    assert _differing(fingerprint, _fp(model.half())) == []


def test_samples_text_of_a_70b_llama_stays_small() -> None:
    tensors = 80 * 9 + 3  # per layer: q, k, v, o, gate, up, down, 2 norms; embeddings, norm, head
    fingerprint = Fingerprint(
        digest="0" * 64, structure="0" * 64, names=tuple(f"t{i}" for i in range(tensors)),
        counts=(SAMPLES_PER_TENSOR,) * tensors, samples=(0.01,) * (tensors * SAMPLES_PER_TENSOR),
    )
    expected = 64 + 1 + 4 * math.ceil(tensors * SAMPLES_PER_TENSOR * 4 / 3)  # base64 of float32
    assert len(fingerprint.samples_text) == expected < 64_000


def test_overflow_to_inf_in_fp16_is_named() -> None:
    model = build_tiny("bert", "cls")
    with torch.no_grad():
        model.classifier.weight.view(-1)[0] = 1e5  # above fp16's largest finite value, 65504
    assert _differing(_fp(model), _fp(model.half())) == ["classifier.weight"]


def test_samples_agree_within_tolerance_nan_with_anything_and_inf_only_with_itself() -> None:
    nan, inf = float("nan"), float("inf")
    pairs = {
        (1.0, 1.005): True, (1.0, 1.01): False, (-1.0, -0.99): False, (2.0**-25, 0.0): True,
        (1e-3, 1e-3 + 1e-5): False, (nan, nan): True, (nan, 1.0): True, (inf, inf): True,
        (inf, -inf): False, (inf, 3e38): False, (0.0, -0.0): True,
    }
    stored, current = (torch.tensor(side, dtype=torch.float32) for side in zip(*pairs))
    assert samples_agree(stored, current).tolist() == list(pairs.values())
    assert samples_agree(current, stored).tolist() == list(pairs.values())


def test_damaged_samples_text_is_a_checkpoint_error() -> None:
    fingerprint = _fp(build_tiny("gpt2", "cls"))
    structure = fingerprint.structure
    # No separator, not base64, not a hex structure, 5 bytes (not whole float32 values).
    bad = ("not a fingerprint", f"{structure}:!!!", f"{'z' * 64}:AAAA", f"{structure}:AAAAAAA=")
    for text in bad:
        with pytest.raises(CheckpointError, match="damaged"):
            fingerprint.differing_tensors("0" * 64, text)
    with pytest.raises(CheckpointError, match="per tensor"):  # one float32 for the whole model
        fingerprint.differing_tensors("0" * 64, f"{structure}:AAAAAA==")


def test_meta_model_has_no_fingerprint() -> None:
    with torch.device("meta"):
        model = torch.nn.Linear(4, 4)
    assert backbone_fingerprint(model, detect_engine(model)) is None


def test_sample_positions_cover_both_ends() -> None:
    positions = sample_positions(1000)
    assert len(positions) == SAMPLES_PER_TENSOR and positions[0] == 0 and positions[-1] == 999
    assert sample_positions(3).tolist() == [0, 1, 2]
