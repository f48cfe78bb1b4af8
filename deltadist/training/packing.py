"""``data.packing``: whole causal_lm examples packed into rows of at most ``model.max_length``
tokens, each example seeing only itself.

Packing is first-fit decreasing (as multipack does): the examples, longest first, each go into the
first row (in the order rows were opened) with room left, or open a new one; no example is cut. A
packed row remembers its examples' lengths (:attr:`TokenizedExample.segments`), and its model
inputs (:func:`packed_inputs`) restart the position ids at 0 for every example and give a 4-D
block-diagonal causal mask, so a token attends only to earlier tokens of its own example. The first
label of every example is masked: it would be predicted from the previous example's last token.
So each example's per-token loss is what it would be alone.

A model's attention only isolates examples if it honours the mask (or, for flash attention, the
position ids): :func:`check_isolation` runs one small probe before training and stops the job
with an error where examples would see each other.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from deltadist.errors import ConfigError
from deltadist.training.text_data import IGNORE_INDEX, TokenizedExample


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of total length <= ``capacity``, first-fit decreasing.

    Longest first (ties in index order), each into the first bin that has room, in O(n log n): a
    tree of the bins' room finds the leftmost bin with enough (bins not yet opened have all of it,
    and they all lie right of the open ones).
    """
    if capacity < 1:
        raise ValueError(f"capacity must be positive, got {capacity}.")
    too_long = [length for length in lengths if length > capacity]
    if too_long:
        raise ValueError(f"an example of {max(too_long)} tokens does not fit a row of {capacity}; "
                         "cut examples to the row length first.")
    size = 1 << max(0, len(lengths) - 1).bit_length()
    room = [capacity] * (2 * size)  # room[size + b]: bin b's room; room[i]: the most below node i
    bins: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        node = 1
        while node < size:  # down to the leftmost leaf with room for it
            node = 2 * node if room[2 * node] >= lengths[index] else 2 * node + 1
        if node - size == len(bins):
            bins.append([])
        bins[node - size].append(index)
        room[node] -= lengths[index]
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return bins


def pack(examples: Sequence[TokenizedExample], block_size: int) -> list[TokenizedExample]:
    """causal_lm examples packed whole into rows of at most ``block_size`` tokens (see the module).

    Each row's :attr:`~TokenizedExample.segments` are its examples' lengths, in the row's order
    (longest first); every example's first label is :data:`IGNORE_INDEX`.
    """
    if any(len(e.input_ids) != len(e.labels) for e in examples):
        raise ValueError("pack takes causal_lm examples (labels as long as input_ids).")
    if any(e.segments for e in examples):
        raise ValueError("pack takes examples that are not packed yet.")
    rows = []
    for members in first_fit_decreasing([len(e.input_ids) for e in examples], block_size):
        parts = [examples[i] for i in members]
        ids = tuple(token for part in parts for token in part.input_ids)
        labels = tuple(label for part in parts for label in (IGNORE_INDEX, *part.labels[1:]))
        rows.append(TokenizedExample(ids, labels, tuple(len(part.input_ids) for part in parts)))
    return rows


def packed_inputs(rows: Sequence[TokenizedExample], pad_token_id: int,
                  mask_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Model inputs of packed rows: ``input_ids``/``position_ids`` ``[rows, longest]`` and, unless
    ``mask_dtype`` is ``None``, ``attention_mask`` ``[rows, 1, longest, longest]``: 0 where a query
    (dim 2) may attend to a key (dim 3) -- an earlier or the same token of its example -- and the
    dtype's lowest value elsewhere (the additive form both eager and sdpa attention take as given).

    ``mask_dtype=None`` is for flash attention, which finds the examples from the position ids
    (transformers' varlen path). A row's padding is one more example of its own (positions from 0,
    attending to itself), so no query row of the mask is empty.
    """
    longest = max(len(row.input_ids) for row in rows)
    ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    positions = torch.zeros((len(rows), longest), dtype=torch.long)
    example = torch.zeros((len(rows), longest), dtype=torch.long)  # which example a token is of
    for r, row in enumerate(rows):
        ids[r, :len(row.input_ids)] = torch.tensor(row.input_ids)
        lengths = list(row.segments or (len(row.input_ids),))
        lengths += [longest - len(row.input_ids)] if len(row.input_ids) < longest else []
        positions[r] = torch.cat([torch.arange(n) for n in lengths])
        example[r] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    inputs = {"input_ids": ids, "position_ids": positions}
    if mask_dtype is not None:
        same = example[:, :, None] == example[:, None, :]
        allowed = same & torch.ones(longest, longest, dtype=torch.bool).tril()
        mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill(~allowed, torch.finfo(mask_dtype).min)
        inputs["attention_mask"] = mask[:, None]
    return inputs


def uses_varlen(attn_implementation: str | None) -> bool:
    """Whether a model's attention (``config._attn_implementation``) is a flash-attention kernel,
    which takes packed examples from the position ids alone (no 4-D mask)."""
    return "flash" in (attn_implementation or "")


PROBE = ((1, 2, 3, 4, 5), (6, 7, 8), (9, 10, 11))
"""Three examples' token ids for :func:`check_isolation` (ids every vocabulary has)."""


def check_isolation(logits: Callable[[dict[str, torch.Tensor]], torch.Tensor], pad_token_id: int,
                    mask_dtype: torch.dtype | None, tolerance: float) -> None:
    """Raise unless packed examples are isolated in the model that ``logits`` runs (inputs ->
    ``[rows, seq, vocab]`` float32 logits).

    The probe packs example ``a`` of :data:`PROBE` first in one row (``a + b``) and last in another
    (``c + a``): isolated, ``a`` has the same logits in both (the same positions, the same tokens
    to attend to); a model that ignores the mask, takes it the wrong way round, or ignores the
    position ids (absolute position embeddings) gives it different ones. The same means a
    difference of at most ``tolerance`` times the largest logit.

    Raises:
        ConfigError: the model's attention lets packed examples see each other.
    """
    a, b, c = PROBE
    rows = [TokenizedExample(a + b, a + b, (len(a), len(b))),
            TokenizedExample(c + a, c + a, (len(c), len(a)))]
    out = logits(packed_inputs(rows, pad_token_id, mask_dtype))
    gap = (out[0, :len(a)] - out[1, len(c):]).abs().max()
    if not gap <= tolerance * out.abs().max():  # a NaN (a mask taken the wrong way round) fails too
        how = "position ids only (flash attention)" if mask_dtype is None else "a 4-D block-diagonal mask"
        raise ConfigError(f"data.packing: this model's attention does not keep packed examples apart "
                          f"(given {how} and per-example position ids, an example's logits change by "
                          f"{float(gap):.3g} with its neighbour); set data.packing: false.")
