"""From tokenized examples to what each rank runs: the step plan, the epoch's order, micro-batches.

A *global batch* (``training.batch_size`` rows) is one optimizer step over every rank. Each rank
takes a contiguous share of it (:func:`rank_share`) and runs it as ``accumulation`` micro-batches,
each padded on its own. Every micro-batch carries ``loss_scale``: its summed loss times
``loss_scale`` is its part of the global batch's mean loss (per target token for the language
tasks, per row for classification), times the world size -- so gradient averaging over ranks
(DDP, FSDP) and summing over micro-batches give exactly the full batch's mean-loss gradient, on
any number of ranks and with any split, and one process reproduces a distributed run.

The order of an epoch is a function of the seed and the epoch only: a resumed run draws the
same batches as an uninterrupted one without saving any sampler state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from deltadist.engines.batch_split import split_batch
from deltadist.training.packing import packed_inputs
from deltadist.training.sources import Mixture
from deltadist.training.text_data import IGNORE_INDEX, TokenizedExample

SORT_WINDOW = 50
"""``data.sort_by_length`` sorts within windows of this many global batches (transformers'
``group_by_length`` does the same), so the order stays random beyond a window."""


def rank_share(size: int, rank: int, world_size: int) -> slice:
    """Rows ``rank`` takes of ``size`` rows: a contiguous slice, in rank order.

    The slices tile ``range(size)``; their lengths differ by at most one (later ranks take the
    extra rows), and are all equal when ``world_size`` divides ``size``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}.")
    return slice(rank * size // world_size, (rank + 1) * size // world_size)


@dataclass(frozen=True)
class StepPlan:
    """How one optimizer step is split, and how many steps the job takes."""

    batch_size: int
    """Global rows per optimizer step."""
    micro_batch_size: int
    """Rows per forward on one rank."""
    accumulation: int
    """Forwards per optimizer step on each rank."""
    steps_per_epoch: int
    total_steps: int


def plan_steps(batch_size: int, micro_batch_size: int | None, accumulation: int | None,
               world_size: int, examples: int, epochs: int, max_steps: int | None) -> StepPlan:
    """The :class:`StepPlan` of ``examples`` training examples (see :func:`split_batch`)."""
    micro_batch_size, accumulation = split_batch(batch_size, micro_batch_size, accumulation, world_size)
    steps_per_epoch = math.ceil(examples / batch_size)
    total = max_steps if max_steps is not None else epochs * steps_per_epoch
    return StepPlan(batch_size, micro_batch_size, accumulation, steps_per_epoch, total)


def epoch_order(lengths: Sequence[int], seed: int, epoch: int, batch_size: int,
                by_length: bool = False, mixture: Mixture | None = None) -> list[int]:
    """Example indices in the order epoch ``epoch`` (0-based) visits them.

    A permutation drawn from ``(seed, epoch)`` alone (with a ``mixture`` of several sources, its
    draw); with ``by_length`` each window of :data:`SORT_WINDOW` global batches is sorted longest
    first, so a batch holds similar lengths.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = (mixture.draw(generator) if mixture is not None
             else torch.randperm(len(lengths), generator=generator).tolist())
    if not by_length:
        return order
    window = SORT_WINDOW * batch_size
    return [i for start in range(0, len(order), window)
            for i in sorted(order[start:start + window], key=lambda i: -lengths[i])]


def global_batches(examples: Sequence[TokenizedExample], order: Sequence[int],
                   batch_size: int) -> Iterator[list[TokenizedExample]]:
    """Consecutive global batches of ``order`` (the last one may be shorter)."""
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start:start + batch_size]]


def batches_after(examples: Sequence[TokenizedExample], lengths: Sequence[int], plan: StepPlan, seed: int,
                  by_length: bool, done: int,
                  mixture: Mixture | None = None) -> Iterator[list[TokenizedExample]]:
    """The global batches of steps ``done + 1 ...`` up to the plan's total, epoch after epoch (a
    resumed run picks up inside the epoch it stopped in)."""
    step = done
    epoch, skip = divmod(done, plan.steps_per_epoch)
    while step < plan.total_steps:
        order = epoch_order(lengths, seed, epoch, plan.batch_size, by_length, mixture)
        for index, batch in enumerate(global_batches(examples, order, plan.batch_size)):
            if index < skip:
                continue
            yield batch
            step += 1
            if step == plan.total_steps:
                return
        epoch, skip = epoch + 1, 0


@dataclass(frozen=True)
class Collator:
    """Pads a list of examples into the task's model inputs.

    ``input_ids``/``attention_mask``: ``[rows, longest]``; ``labels``: ``[rows, longest target]``
    (IGNORE_INDEX where padded) or ``[rows]`` (classification); seq2seq also gets
    ``decoder_input_ids``: the labels shifted right behind ``decoder_start_token_id``. Packed rows
    (causal_lm, ``data.packing``) get per-example ``position_ids`` and a 4-D ``attention_mask`` in
    ``mask_dtype`` instead (see :func:`~deltadist.training.packing.packed_inputs`).
    """

    task: str
    pad_token_id: int
    decoder_start_token_id: int | None = None
    mask_dtype: torch.dtype | None = torch.float32
    """Packed rows' additive mask dtype (the backbone's); ``None``: no mask (flash attention)."""

    def __call__(self, rows: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        if any(r.segments for r in rows):
            batch = packed_inputs(rows, self.pad_token_id, self.mask_dtype)
            batch["labels"] = _pad([r.labels for r in rows], IGNORE_INDEX)
            return batch
        input_ids = _pad([r.input_ids for r in rows], self.pad_token_id)
        batch = {"input_ids": input_ids,
                 "attention_mask": _pad([[1] * len(r.input_ids) for r in rows], 0)}
        if self.task == "sequence_classification":
            batch["labels"] = torch.tensor([r.labels[0] for r in rows])
            return batch
        labels = _pad([r.labels for r in rows], IGNORE_INDEX)
        batch["labels"] = labels
        if self.task == "seq2seq":
            shifted = labels.new_full(labels.shape, self.pad_token_id)
            shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, self.pad_token_id)
            shifted[:, 0] = self.decoder_start_token_id
            batch["decoder_input_ids"] = shifted
        return batch


def _pad(sequences: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    longest = max(1, max(len(s) for s in sequences))
    return torch.tensor([list(s) + [value] * (longest - len(s)) for s in sequences])


def loss_units(task: str, example: TokenizedExample) -> int:
    """What the mean loss averages over in ``example``: its predicted target tokens (a causal LM
    predicts token t+1 at t, so the first label never counts), or 1 row for classification."""
    if task == "sequence_classification":
        return 1
    labels = example.labels[1:] if task == "causal_lm" else example.labels
    return sum(label != IGNORE_INDEX for label in labels)


@dataclass
class MicroBatch:
    """One forward on one rank."""

    inputs: dict[str, torch.Tensor]
    loss_scale: float
    """Summed loss x this = its part of the global mean, times the world size (0 for a stand-in)."""
    tokens: int
    """Real (unpadded) input tokens, for throughput."""


def micro_batches(batch: list[TokenizedExample], task: str, collate: Collator, rank: int,
                  world_size: int, accumulation: int, global_units: int | None = None) -> list[MicroBatch]:
    """This rank's ``accumulation`` micro-batches of the global ``batch`` -- or, given the global
    batch's ``global_units`` (summed over the ranks), of ``batch`` as this rank's rows alone
    (``data.streaming``: each rank reads its own rows).

    A micro-batch left empty by a short last batch runs the batch's first row with
    ``loss_scale = 0``: every rank takes the same number of forwards and backwards, which the
    collectives of DDP and FSDP expect.
    """
    units = sum(loss_units(task, example) for example in batch) if global_units is None else global_units
    scale = world_size / units if units else 0.0
    share = batch[rank_share(len(batch), rank, world_size)] if global_units is None else batch
    result = []
    for step in range(accumulation):
        rows = share[rank_share(len(share), step, accumulation)]
        weight = scale
        if not rows:
            rows, weight = batch[:1], 0.0
        tokens = sum(len(r.input_ids) for r in rows) if weight else 0
        result.append(MicroBatch(collate(rows), weight, tokens))
    return result
