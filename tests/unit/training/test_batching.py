"""Global batches over ranks and micro-batches: every row once, and exactly the full batch's gradient.

No process is started: each rank's micro-batches are built for every rank in turn, run through a
tiny model, and the ranks' gradients are summed over micro-batches and averaged over ranks, as
gradient accumulation and DDP/FSDP do; the result must be the single process's mean-loss gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltadist.errors import ConfigError
from deltadist.training.batching import (
    Collator, epoch_order, global_batches, loss_units, micro_batches, plan_steps, rank_share,
)
from deltadist.engines.batch_split import split_batch
from deltadist.training.objectives import summed_loss
from deltadist.training.text_data import IGNORE_INDEX, TokenizedExample

VOCAB = 20


def lm_examples(n: int) -> list[TokenizedExample]:
    """Examples of 2..7 tokens; the first ``i % 3`` tokens are prompt (no loss)."""
    rows = []
    for i in range(n):
        ids = tuple(3 + (i * 7 + j * 3) % (VOCAB - 3) for j in range(2 + i % 6))
        prompt = min(i % 3, len(ids) - 1)
        rows.append(TokenizedExample(ids, (IGNORE_INDEX,) * prompt + ids[prompt:]))
    return rows


def class_examples(n: int) -> list[TokenizedExample]:
    return [TokenizedExample(tuple(3 + (i + j) % 10 for j in range(1 + i % 4)), (i % 3,)) for i in range(n)]


class TinyLM(nn.Module):
    """Embedding -> linear over the vocabulary; the interface of a transformers causal LM."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(input_ids)))


class TinyClassifier(TinyLM):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        return self.head(torch.tanh((self.embed(input_ids) * mask).sum(1) / mask.sum(1)))[:, :3]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 7, 8, 16, 17])
def test_rank_shares_tile_the_batch_in_rank_order(size: int, world_size: int) -> None:
    shares = [rank_share(size, r, world_size) for r in range(world_size)]
    assert shares[0].start == 0 and shares[-1].stop == size
    assert all(a.stop == b.start for a, b in zip(shares, shares[1:]))
    lengths = [s.stop - s.start for s in shares]
    assert max(lengths) - min(lengths) <= 1
    if size % world_size == 0:
        assert lengths == [size // world_size] * world_size


def test_rank_share_rejects_a_rank_outside_the_world() -> None:
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        rank_share(8, 2, 2)


@pytest.mark.parametrize(("batch", "micro", "accumulation", "world", "expected"), [
    (32, None, None, 1, (32, 1)), (32, None, None, 4, (8, 1)), (32, 2, None, 4, (2, 4)),
    (32, None, 4, 2, (4, 4)), (32, 4, 4, 2, (4, 4)),
])
def test_batch_split_is_derived_from_either_key(batch, micro, accumulation, world, expected) -> None:
    assert split_batch(batch, micro, accumulation, world) == expected


@pytest.mark.parametrize(("args", "message"), [
    ((30, None, None, 4), r"training.batch_size \(30\) must be divisible by the world size \(4\).*=28"),
    ((32, 3, None, 2), r"16 rows per rank, which is not micro_batch_size x gradient_accumulation_steps "
                       r"\(3 x 5\)"),
    ((32, 4, 2, 2), r"\(4 x 2\); set one of the two to null"),
])
def test_a_batch_that_does_not_split_is_a_config_error(args, message) -> None:
    with pytest.raises(ConfigError, match=message):
        split_batch(*args)


def test_step_plan_counts_partial_batches_and_max_steps_wins() -> None:
    plan = plan_steps(8, None, None, 2, examples=20, epochs=3, max_steps=None)
    assert (plan.micro_batch_size, plan.accumulation, plan.steps_per_epoch, plan.total_steps) == (4, 1, 3, 9)
    assert plan_steps(8, None, None, 2, examples=20, epochs=3, max_steps=5).total_steps == 5


def test_epoch_order_depends_on_seed_and_epoch_only() -> None:
    lengths = list(range(40))
    first = epoch_order(lengths, seed=1, epoch=0, batch_size=4)
    assert sorted(first) == lengths and first == epoch_order(lengths, seed=1, epoch=0, batch_size=4)
    assert first != epoch_order(lengths, seed=1, epoch=1, batch_size=4)
    assert first != epoch_order(lengths, seed=2, epoch=0, batch_size=4)


def test_sort_by_length_sorts_within_windows_and_keeps_every_example(monkeypatch) -> None:
    import deltadist.training.batching as batching

    monkeypatch.setattr(batching, "SORT_WINDOW", 2)
    lengths = [(i * 7) % 13 for i in range(30)]
    order = epoch_order(lengths, seed=0, epoch=0, batch_size=5, by_length=True)
    assert sorted(order) == list(range(30))
    for start in range(0, 30, 10):
        window = [lengths[i] for i in order[start:start + 10]]
        assert window == sorted(window, reverse=True)
    assert order != sorted(range(30), key=lambda i: -lengths[i])  # windows, not one global sort


def test_collator_pads_per_batch_and_shifts_seq2seq_labels() -> None:
    rows = [TokenizedExample((5, 6, 7), (IGNORE_INDEX, 6, 7)), TokenizedExample((8,), (8,))]
    batch = Collator("causal_lm", pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    seq2seq = Collator("seq2seq", pad_token_id=0, decoder_start_token_id=1)(
        [TokenizedExample((5, 6), (9, 10, 3)), TokenizedExample((5,), (11, 3))])
    assert seq2seq["labels"].tolist() == [[9, 10, 3], [11, 3, IGNORE_INDEX]]
    assert seq2seq["decoder_input_ids"].tolist() == [[1, 9, 10], [1, 11, 3]]
    classes = Collator("sequence_classification", pad_token_id=0)(class_examples(3))
    assert classes["labels"].tolist() == [0, 1, 2]


def test_loss_units_count_predicted_targets() -> None:
    example = TokenizedExample((5, 6, 7, 8), (IGNORE_INDEX, IGNORE_INDEX, 7, 8))
    assert loss_units("causal_lm", example) == 2
    assert loss_units("causal_lm", TokenizedExample((5, 6), (5, 6))) == 1  # the first token is not predicted
    assert loss_units("seq2seq", TokenizedExample((5,), (9, 10, 3))) == 3
    assert loss_units("sequence_classification", class_examples(1)[0]) == 1


def test_a_rank_with_nothing_left_runs_a_weightless_row() -> None:
    batch = lm_examples(1)  # one row for 4 ranks: three get a stand-in
    collate = Collator("causal_lm", pad_token_id=0)
    shares = [micro_batches(batch, "causal_lm", collate, r, 4, 1) for r in range(4)]
    assert [len(s) for s in shares] == [1, 1, 1, 1]
    assert [s[0].loss_scale for s in shares[:3]] == [0.0, 0.0, 0.0] and shares[3][0].loss_scale > 0
    assert [s[0].tokens for s in shares] == [0, 0, 0, 2]


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
@pytest.mark.parametrize(("n", "world_size", "accumulation"), [
    (24, 1, 1), (24, 1, 3), (24, 2, 2), (29, 2, 3), (25, 4, 1), (26, 3, 2), (13, 4, 3),
])
def test_accumulated_rank_gradients_average_to_the_full_batch_gradient(
        task: str, n: int, world_size: int, accumulation: int) -> None:
    model = TinyLM() if task == "causal_lm" else TinyClassifier()
    examples = lm_examples(n) if task == "causal_lm" else class_examples(n)
    collate = Collator(task, pad_token_id=0)

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    for batch in global_batches(examples, range(n), 12):
        rows = collate(batch)
        loss_sum, _ = summed_loss(task, model, rows)
        expected = grads(loss_sum / sum(loss_units(task, e) for e in batch))  # the batch's mean loss
        total = [torch.zeros_like(g) for g in expected]
        for rank in range(world_size):
            micros = micro_batches(batch, task, collate, rank, world_size, accumulation)
            assert len(micros) == accumulation
            for micro in micros:
                loss_sum, _ = summed_loss(task, model, micro.inputs)
                total = [t + g / world_size for t, g in zip(total, grads(loss_sum * micro.loss_scale))]
        for got, want in zip(total, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_every_row_is_in_exactly_one_micro_batch() -> None:
    examples = lm_examples(23)
    collate = Collator("causal_lm", pad_token_id=0)
    for batch in global_batches(examples, range(23), 8):
        seen = []
        for rank in range(2):
            for micro in micro_batches(batch, "causal_lm", collate, rank, 2, 2):
                if micro.loss_scale:
                    for row, mask in zip(micro.inputs["input_ids"], micro.inputs["attention_mask"]):
                        seen.append(tuple(row[mask.bool()].tolist()))
        assert seen == [e.input_ids for e in batch]
