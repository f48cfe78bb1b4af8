"""``data.packing``: first-fit-decreasing bins of whole examples, and packed rows whose examples
do not see each other (each example's per-token loss is the one it has alone)."""

from __future__ import annotations

import random

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from deltadist.errors import ConfigError
from deltadist.training.batching import Collator, loss_units
from deltadist.training.packing import check_isolation, first_fit_decreasing, pack, packed_inputs
from deltadist.training.text_data import IGNORE_INDEX, TokenizedExample
from tests.task_jobs import FAMILIES

X = IGNORE_INDEX


def _example(length: int, start: int = 1) -> TokenizedExample:
    ids = tuple(range(start, start + length))
    return TokenizedExample(ids, ids)


# --- bin packing ---------------------------------------------------------------------------------

def test_first_fit_decreasing_places_the_longest_first_into_the_first_bin_with_room() -> None:
    # Sorted: 7 (0), 6 (3), 5 (1), 4 (5), 2 (2), 2 (4), 1 (6). 7 opens bin 0 (room 3); 6 opens bin 1
    # (room 4); 5 opens bin 2 (room 5); 4 fits bin 1 (room 0); 2 fits bin 0 (room 1); the next 2 goes
    # to bin 2 (bin 0 is too full); 1 fills bin 0.
    assert first_fit_decreasing([7, 5, 2, 6, 2, 4, 1], 10) == [[0, 2, 6], [3, 5], [1, 4]]
    assert first_fit_decreasing([3, 3, 3], 3) == [[0], [1], [2]]
    assert first_fit_decreasing([], 8) == []


def test_first_fit_decreasing_matches_the_quadratic_definition() -> None:
    rng = random.Random(0)
    for _ in range(30):
        capacity = rng.randint(1, 40)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 120))]
        bins: list[list[int]] = []
        room: list[int] = []
        for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            b = next((b for b, r in enumerate(room) if r >= lengths[index]), len(bins))
            if b == len(bins):
                bins.append([])
                room.append(capacity)
            bins[b].append(index)
            room[b] -= lengths[index]
        assert first_fit_decreasing(lengths, capacity) == bins


def test_an_example_longer_than_the_row_is_refused_not_cut() -> None:
    with pytest.raises(ValueError, match="an example of 9 tokens does not fit a row of 8"):
        first_fit_decreasing([3, 9, 2], 8)
    with pytest.raises(ValueError, match="does not fit"):
        pack([_example(9)], 8)


def test_pack_keeps_every_example_whole_and_masks_each_first_label() -> None:
    examples = [_example(n, start=10 * i) for i, n in enumerate([5, 3, 6, 2, 4])]
    examples[1] = TokenizedExample(examples[1].input_ids, (X, X, 12))  # a prompt of two tokens
    rows = pack(examples, 8)
    assert [row.segments for row in rows] == [(6, 2), (5, 3), (4,)]
    assert rows[0] == TokenizedExample((20, 21, 22, 23, 24, 25, 30, 31), (X, 21, 22, 23, 24, 25, X, 31),
                                       (6, 2))
    assert rows[1].labels == (X, 1, 2, 3, 4, X, X, 12)
    assert sorted(token for row in rows for token in row.input_ids) == sorted(
        token for e in examples for token in e.input_ids)
    # The loss averages over the same target tokens packed or not.
    units = sum(loss_units("causal_lm", e) for e in examples)
    assert sum(loss_units("causal_lm", row) for row in rows) == units
    with pytest.raises(ValueError, match="causal_lm examples"):
        pack([TokenizedExample((1, 2, 3), (0,))], 4)


def test_packed_inputs_restart_positions_and_isolate_each_example() -> None:
    rows = [TokenizedExample((5, 6, 7, 8, 9), (X,) * 5, (3, 2)), TokenizedExample((5, 6, 7), (X,) * 3, (3,))]
    inputs = packed_inputs(rows, pad_token_id=0, mask_dtype=torch.float32)
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]  # padding: its own
    allowed = (inputs["attention_mask"] == 0).int()
    assert allowed.shape == (2, 1, 5, 5)
    block = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert allowed[0, 0].tolist() == block and allowed[1, 0].tolist() == block
    assert inputs["attention_mask"].min() == torch.finfo(torch.float32).min
    assert "attention_mask" not in packed_inputs(rows, 0, None)  # flash attention: positions only


# --- the loss of a packed example is its loss alone ---------------------------------------------

def _model(family: str, attention: str) -> torch.nn.Module:
    config = AutoConfig.for_model(family, **FAMILIES[family], vocab_size=50, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()


def _token_losses(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[rows, seq - 1]`` cross-entropy of each label (0 where ignored)."""
    labels = inputs.pop("labels")
    logits = model(**inputs).logits.float()
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=X, reduction="none")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_packed_example_has_the_per_token_loss_it_has_alone(family: str, attention: str) -> None:
    model = _model(family, attention)
    rng = random.Random(1)
    examples = []
    for _ in range(9):
        ids = tuple(rng.randrange(1, 50) for _ in range(rng.randint(2, 12)))
        prompt = rng.randint(0, len(ids) - 1)
        examples.append(TokenizedExample(ids, (X,) * prompt + ids[prompt:]))
    rows = pack(examples, 24)
    assert len(rows) < len(examples) and max(len(row.segments) for row in rows) >= 3
    collate = Collator("causal_lm", pad_token_id=0)
    bins = first_fit_decreasing([len(e.input_ids) for e in examples], 24)  # the order pack places them in
    with torch.no_grad():
        packed = _token_losses(model, collate(rows))
        for r, members in enumerate(bins):
            start = 0
            for i in members:
                length = len(examples[i].input_ids)
                alone = _token_losses(model, collate([examples[i]]))[0]
                # Its first token is not predicted from the example before it (index start - 1) ...
                assert start == 0 or packed[r, start - 1] == 0
                # ... and its other tokens have the losses they have alone.
                torch.testing.assert_close(packed[r, start:start + length - 1], alone, atol=1e-5, rtol=0)
                start += length
        assert packed.sum() > 0


def test_the_isolation_check_passes_an_isolating_model_and_stops_a_leaking_one() -> None:
    model = _model("llama", "sdpa")

    def logits(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**inputs).logits.float()

    with torch.no_grad():
        check_isolation(logits, 0, torch.float32, tolerance=1e-4)
        # A model that gets neither the mask nor the positions: the later example sees the earlier.
        with pytest.raises(ConfigError, match="data.packing: this model's attention does not keep packed"):
            check_isolation(lambda inputs: logits({"input_ids": inputs["input_ids"]}), 0, torch.float32, 1e-4)
        # A mask of the wrong sign convention (1 = attend, as transformers' older 4-D masks) fails too.
        with pytest.raises(ConfigError, match="does not keep packed examples apart"):
            check_isolation(lambda inputs: logits({**inputs, "attention_mask": (inputs["attention_mask"] == 0)
                                                   .float()}), 0, torch.float32, 1e-4)
    # Absolute position embeddings (GPT-2) given no position ids: an example's positions shift.
    gpt2 = _model("gpt2", "sdpa")
    with torch.no_grad(), pytest.raises(ConfigError, match="does not keep packed examples apart"):
        check_isolation(lambda inputs: gpt2(input_ids=inputs["input_ids"],
                                            attention_mask=inputs["attention_mask"]).logits,
                        0, torch.float32, 1e-4)
