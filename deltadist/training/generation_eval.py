"""``training.eval_generation``: greedy generation from each evaluation row's prompt, compared with
its reference completion (``exact_match`` after stripping whitespace, or ``contains``).

A row's prompt and reference come from its tokenized example: the reference is its last run of
target tokens (a prompt/completion row's completion and eos; a chat row's last assistant turn with
its end-of-turn marker), the prompt everything before it (a chat row's conversation up to that
turn, ending with the template's generation prompt).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from deltadist.errors import ConfigError
from deltadist.training.batching import global_batches, rank_share
from deltadist.training.steps import StepRunner
from deltadist.training.text_data import IGNORE_INDEX, TokenizedExample


def check_generation_rows(dataset: Any, chat: bool, path: Any) -> None:
    """Every evaluation row has a prompt to generate from: chat rows, or prompt/completion rows.

    Raises:
        ConfigError: a text row (no prompt) among them.
    """
    if chat:
        return
    prompts = dataset["prompt"][:] if "prompt" in dataset.column_names else [None] * dataset.num_rows
    missing = [index for index, prompt in enumerate(prompts, 1) if prompt is None]
    if missing:
        raise ConfigError(f"training.eval_generation: data.eval row {missing[0]} of {path} has no prompt "
                          "to generate from; give prompt/completion (or chat) rows, or set "
                          "training.eval_generation: null.")


def split_reference(example: TokenizedExample) -> tuple[list[int], list[int]]:
    """``(prompt ids, reference ids)``: the example's last run of target tokens and what precedes it."""
    labels = example.labels
    end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(example.input_ids[:start]), list(example.input_ids[start:end])


def stop_ids(examples: Sequence[TokenizedExample], tokenizer: Any) -> list[int]:
    """The tokens that end a generated completion: eos, and the special tokens the references end
    with (a chat template's end-of-turn marker, which the model learnt to emit)."""
    special = set(tokenizer.all_special_ids) | {
        index for index, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    ends = {reference[-1] for reference in (split_reference(e)[1] for e in examples) if reference}
    found = (ends & special) | ({tokenizer.eos_token_id} - {None})
    return sorted(found)


def completion_text(ids: Sequence[int], tokenizer: Any, stops: Sequence[int]) -> str:
    """The text of ``ids`` up to the first stop token, special tokens dropped, whitespace stripped."""
    cut = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    return tokenizer.decode(list(ids[:cut]), skip_special_tokens=True).strip()


def matches(generated: str, reference: str, metric: str) -> bool:
    """Whether ``generated`` meets ``metric`` (``exact_match`` or ``contains``) for ``reference``."""
    return generated == reference if metric == "exact_match" else reference in generated


@torch.no_grad()
def generate_batch(model: nn.Module, prompts: Sequence[Sequence[int]], pad_token_id: int,
                   max_new_tokens: int, stops: Sequence[int], synced: bool,
                   sampling: Mapping[str, Any] | None = None) -> list[list[int]]:
    """Continuations (at most ``max_new_tokens`` ids each) of ``prompts``, left-padded into one
    ``[rows, longest]`` batch: greedy, or with ``sampling`` (``do_sample``, ``temperature``,
    ``top_p``: ``generate``'s); ``synced``: every rank keeps running forwards until all are done."""
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_token_id] * (longest - len(p)) + list(p) for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    options = dict(sampling or {"do_sample": False})
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=1,
                            max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                            eos_token_id=list(stops) or None, synced_gpus=synced, **options)
    return output[:, longest:].tolist()


def generation_score(steps: StepRunner, model: nn.Module, examples: Sequence[TokenizedExample],
                     tokenizer: Any, metric: str, max_new_tokens: int, batch_size: int,
                     synced: bool, desc: str) -> dict[str, float]:
    """``{metric: fraction of rows whose greedy completion meets it}``, each rank generating for its
    share of every batch of ``batch_size`` rows (a rank left without rows generates for the batch's
    first row and counts nothing, so that every rank runs as many forwards under ``synced``)."""
    engine = steps.engine
    stops = stop_ids(examples, tokenizer)
    steps.runner.eval()
    met = 0
    batches = list(global_batches(examples, range(len(examples)), batch_size))
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not engine.is_main):
        share = batch[rank_share(len(batch), engine.rank, engine.world_size)]
        rows = share or batch[:1]
        pairs = [split_reference(e) for e in rows]
        # A row whose completion model.max_length cut off entirely still generates (from all its
        # tokens: the ranks' forwards stay in step) and counts as a miss.
        prompts = [prompt if reference else list(e.input_ids) for e, (prompt, reference) in zip(rows, pairs)]
        with steps.autocast():
            continuations = generate_batch(model, prompts, tokenizer.pad_token_id, max_new_tokens, stops,
                                           synced)
        if share:
            met += sum(bool(r) and matches(completion_text(c, tokenizer, stops),
                                           completion_text(r, tokenizer, stops), metric)
                       for c, (_, r) in zip(continuations, pairs))
    total = engine.sum_over_ranks(torch.tensor(float(met), device=engine.device))
    return {metric: float(total) / len(examples)}
