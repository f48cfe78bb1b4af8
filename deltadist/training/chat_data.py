"""Chat rows for ``deltadist train`` (task ``causal_lm``): conversations rendered with a chat template,
the loss on the assistant turns only.

A chat row is ``{"messages": [{"role": "user", "content": "..."}, ...]}`` (roles ``system``,
``user``, ``assistant``) or ShareGPT's ``{"conversations": [{"from": "human", "value": "..."}, ...]}``
(``from``: ``system``, ``human``, ``gpt``; either spelling in either column). Every problem is a
one-line :class:`ConfigError` naming the row (1-based) and, where it helps, the turn.

How the assistant tokens are found: for each assistant turn ``k`` the template renders the
conversation before it with the generation prompt (``<|im_start|>assistant\\n``) and the
conversation up to and including it; the characters between the two are the turn's (its content
and the template's end-of-turn text, e.g. ``<|im_end|>``), and both renderings must be prefixes of
the whole conversation's. Whitespace that ends the turn's characters is the template's separator
(ChatML's newline after ``<|im_end|>``), not the model's to say, and is left out. The whole
conversation is then tokenized once (as at inference, no special tokens added: the template writes
them) and a token is trained iff it starts inside an assistant turn's characters. This works for
any template that renders a turn independently of the turns after it -- ChatML, Llama 3, Mistral,
Gemma, Phi -- whereas transformers' ``return_assistant_tokens_mask`` needs ``{% generation %}``
markers that few shipped templates have. A template that rewrites earlier turns as the
conversation grows (e.g. one that drops the reasoning of earlier assistant turns) fails the prefix
check, and that is an error naming the row, not a silently wrong mask.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltadist.errors import ConfigError
from deltadist.training.text_data import IGNORE_INDEX, TokenizedExample, _fields_of, _where

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

CHAT_FIELDS = ("messages", "conversations")
"""The columns that hold a chat row's turns, looked for in this order (unless ``data.messages_field``)."""
ROLES = {"system": "system", "user": "user", "assistant": "assistant",
         "human": "user", "gpt": "assistant"}
"""Role names a turn may have, and the role the chat template sees (ShareGPT's ``human``/``gpt``)."""

Conversation = list[dict[str, str]]


def chat_fields(dataset: datasets.Dataset, configured: str | None, path: str | os.PathLike,
                key: str) -> tuple[str, ...]:
    """The columns of ``dataset`` that hold conversations: ``(configured,)`` (an error if missing), else
    those of :data:`CHAT_FIELDS` present (a file may mix both spellings); ``()``: not chat rows."""
    if configured is not None:
        if configured not in dataset.column_names:
            raise ConfigError(f"{_where(key, path)} has no '{configured}' column (it has: "
                              f"{', '.join(dataset.column_names)}); set data.messages_field to the "
                              "column that holds the conversations, or null to find it.")
        return (configured,)
    return tuple(name for name in CHAT_FIELDS if name in dataset.column_names)


def read_template(configured: str | None) -> str | None:
    """``data.chat_template`` as Jinja text: a file's contents, the string itself, or ``None``."""
    if configured is None:
        return None
    if "{{" in configured or "{%" in configured:
        return configured
    path = Path(configured)
    if not path.is_file():
        raise ConfigError(f"data.chat_template: {configured!r} is neither a file nor a Jinja template; "
                          "give the path of a template file or the template itself.")
    return path.read_text(encoding="utf-8")


def chat_rows(dataset: datasets.Dataset, fields: tuple[str, ...], path: str | os.PathLike,
              key: str, answered: bool = True) -> list[Conversation]:
    """Each row's turns (from the one of ``fields`` it has) as ``[{"role", "content"}, ...]`` in the
    roles a template expects, every row checked: a list of turns, known roles, string contents, and
    (``answered``: rows to learn from) at least one assistant turn."""
    rows = []
    for index, values in enumerate(zip(*(dataset[field][:] for field in fields))):
        where = _where(key, path, index + 1)
        given = [(field, turns) for field, turns in zip(fields, values) if turns is not None]
        if len(given) != 1:
            names = " or ".join(f"'{field}'" for field in fields)
            raise ConfigError(f"{where}: {'no' if not given else 'more than one'} {names} field (it has: "
                              f"{_fields_of(dataset, index)}); in a file of chat rows every row needs "
                              "exactly one list of turns.")
        field, turns = given[0]
        if not isinstance(turns, list) or not turns:
            raise ConfigError(f"{where}: '{field}' must be a non-empty list of turns "
                              '({"role": ..., "content": ...}), got ' f"{turns!r}.")
        rows.append([_turn(turn, f"{where} turn {number}") for number, turn in enumerate(turns, 1)])
        if answered and not any(turn["role"] == "assistant" for turn in rows[-1]):
            raise ConfigError(f"{where} has no assistant turn, so nothing to learn; add the answer "
                              "(role assistant, or from gpt) or remove the row.")
    return rows


def _turn(turn: Any, where: str) -> dict[str, str]:
    """One turn as ``{"role", "content"}``, from either spelling."""
    if not isinstance(turn, dict):
        raise ConfigError(f"{where} is a {type(turn).__name__}, not a turn; write it as "
                          '{"role": ..., "content": ...}.')
    role = turn.get("role") if turn.get("role") is not None else turn.get("from")
    content = turn.get("content") if turn.get("content") is not None else turn.get("value")
    if role not in ROLES:
        raise ConfigError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}; fix the turn's "
                          "'role' (or ShareGPT 'from').")
    if not isinstance(content, str):
        raise ConfigError(f"{where}: no text content (got {content!r}); give the turn a 'content' "
                          "(or ShareGPT 'value') string.")
    return {"role": ROLES[role], "content": content}


def tokenize_chat(rows: list[Conversation], tokenizer: PreTrainedTokenizerBase, template: str | None,
                  max_length: int, path: str | os.PathLike, key: str) -> list[TokenizedExample]:
    """One example per conversation: ids of its rendering, labels on the assistant turns only
    (see the module's docstring), both cut to ``max_length`` tokens together."""
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError(f"{key}: {os.fspath(path)} holds chat rows, but the tokenizer of "
                          "model.name_or_path has no chat template; set data.chat_template to a Jinja "
                          "template or a file holding one.")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{key}: chat rows need a fast tokenizer (for the character offsets of its "
                          "tokens); use a checkpoint with a tokenizer.json.")
    rendered = [_render(turns, tokenizer, template, _where(key, path, row))
                for row, turns in enumerate(rows, 1)]
    # One batched call (as at inference, no special tokens added: the template writes them).
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False,
                        return_offsets_mapping=True, return_attention_mask=False, verbose=False)
    examples, lost = [], 0
    for row, (ids, offsets, (_, spans)) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"],
                                                          rendered), 1):
        labels = [token if end > start and any(a <= start < b for a, b in spans) else IGNORE_INDEX
                  for token, (start, end) in zip(ids, offsets)]
        if all(label == IGNORE_INDEX for label in labels):
            raise ConfigError(f"{_where(key, path, row)}: the chat template renders the assistant turns "
                              "as no tokens; check data.chat_template.")
        lost += all(label == IGNORE_INDEX for label in labels[:max_length])
        examples.append(TokenizedExample(tuple(ids[:max_length]), tuple(labels[:max_length])))
    if lost == len(rows):
        raise ConfigError(f"{key}: in every row of {os.fspath(path)} the turns before the first answer "
                          f"fill model.max_length ({max_length} tokens), so no assistant token is left "
                          "to learn; raise model.max_length or shorten the conversations.")
    if lost:
        warnings.warn(f"{key}: in {lost} of {len(rows)} chat rows of {os.fspath(path)} the turns before "
                      f"the first answer fill model.max_length ({max_length} tokens), so they add no "
                      "loss; raise model.max_length to learn from them.", stacklevel=3)
    return examples


def _render(turns: Conversation, tokenizer: PreTrainedTokenizerBase, template: str,
            where: str) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation as text and the character spans of its assistant turns."""
    def render(part: Conversation, prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(part, chat_template=template, tokenize=False,
                                                 add_generation_prompt=prompt)
        except Exception as error:  # jinja2's errors, and the template's own raise_exception
            reason = " ".join(str(error).split()) or type(error).__name__
            raise ConfigError(f"{where}: the chat template cannot render this conversation ({reason}); fix "
                              "the row, or set data.chat_template to a template that takes it.") from error

    text = render(turns, False)
    spans = []
    for number, turn in enumerate(turns, 1):
        if turn["role"] != "assistant":
            continue
        start, end = render(turns[:number - 1], True), render(turns[:number], False)
        if not (text.startswith(end) and end.startswith(start)):
            raise ConfigError(f"{where} turn {number}: the chat template renders the conversation up to "
                              "this assistant turn differently from the start of the whole, so its "
                              "tokens cannot be told apart; use a template that renders each turn "
                              "independently of later ones (data.chat_template).")
        spans.append((len(start), len(end.rstrip())))  # the newline after <|im_end|>: not the turn's
    return text, spans
