"""Chat rows for ``deltadist train``: rendered with a real chat template (ChatML, Llama 3), the loss
on the assistant turns only, checked token by token; bad rows are one-line errors naming the row."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import datasets
import pytest

from deltadist.errors import ConfigError
from deltadist.training.chat_data import chat_fields, chat_rows, read_template, tokenize_chat
from deltadist.training.config import from_dict
from deltadist.training.data_files import load_split
from deltadist.training.job_data import load_rows, tokenize
from deltadist.training.text_data import IGNORE_INDEX, TokenizedExample
from tests.text_tasks import (
    CHAT_SPECIALS,
    CHATML,
    LLAMA3,
    byte_level_chat_tokenizer,
    chat_tokenizer,
    word_tokenizer,
    write_jsonl,
)

WORDS = ["be brief", "what is two plus two", "four", "and three", "six", "hi"]
SYSTEM = {"role": "system", "content": "be brief"}
ASK = {"role": "user", "content": "what is two plus two"}
ANSWER = {"role": "assistant", "content": "four"}


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))


def _error(call: Callable[[], object]) -> str:
    with pytest.raises(ConfigError) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def _examples(rows: list[dict[str, Any]], tmp_path: Path, tokenizer: Any = None, template: str | None = None,
              max_length: int = 64) -> list[TokenizedExample]:
    path = str(tmp_path / "chat.jsonl")
    write_jsonl(path, rows)
    dataset = load_split(path, "data.train")
    fields = chat_fields(dataset, None, path, "data.train")
    assert fields
    conversations = chat_rows(dataset, fields, path, "data.train")
    return tokenize_chat(conversations, tokenizer or chat_tokenizer(WORDS), template, max_length, path,
                         "data.train")


def _marked(example: TokenizedExample, tokenizer: Any) -> list[str]:
    """Each token, with a ``+`` in front where it is trained (its label is itself)."""
    tokens = tokenizer.convert_ids_to_tokens(list(example.input_ids))
    assert len(example.labels) == len(tokens)
    for token, label in zip(example.input_ids, example.labels):
        assert label in (token, IGNORE_INDEX)
    return [("+" if label != IGNORE_INDEX else "") + token for token, label in zip(tokens, example.labels)]


def test_chatml_trains_the_assistant_content_and_its_end_token_only(tmp_path: Path) -> None:
    tokenizer = chat_tokenizer(WORDS)
    [example] = _examples([{"messages": [SYSTEM, ASK, ANSWER]}], tmp_path, tokenizer)
    assert _marked(example, tokenizer) == [
        "<|im_start|>", "system", "be", "brief", "<|im_end|>",
        "<|im_start|>", "user", "what", "is", "two", "plus", "two", "<|im_end|>",
        "<|im_start|>", "assistant", "+four", "+<|im_end|>",
    ]


def test_a_byte_level_tokenizer_trains_the_answers_and_im_end_not_the_newline(tmp_path: Path) -> None:
    # Byte-level BPE (GPT-2, Qwen): words split into pieces, ChatML's newlines are tokens ("Ċ").
    tokenizer = byte_level_chat_tokenizer(WORDS)
    turns = [SYSTEM, ASK, ANSWER, {"role": "user", "content": "and three"},
             {"role": "assistant", "content": "six"}]
    [example] = _examples([{"messages": turns}], tmp_path, tokenizer)
    marked = _marked(example, tokenizer)
    assert marked.count("Ċ") == 10 and marked.count("<|im_start|>") == 5
    assert tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX]) \
        == "four<|im_end|>six<|im_end|>"
    ends = [i for i, token in enumerate(marked) if token == "+<|im_end|>"]
    assert len(ends) == 2 and all(marked[i + 1] == "Ċ" for i in ends)  # the newline after: untrained


def test_two_assistant_turns_are_both_trained(tmp_path: Path) -> None:
    tokenizer = chat_tokenizer(WORDS)
    turns = [ASK, ANSWER, {"role": "user", "content": "and three"}, {"role": "assistant", "content": "six"}]
    [example] = _examples([{"messages": turns}], tmp_path, tokenizer)
    assert _marked(example, tokenizer) == [
        "<|im_start|>", "user", "what", "is", "two", "plus", "two", "<|im_end|>",
        "<|im_start|>", "assistant", "+four", "+<|im_end|>",
        "<|im_start|>", "user", "and", "three", "<|im_end|>",
        "<|im_start|>", "assistant", "+six", "+<|im_end|>",
    ]


def test_sharegpt_rows_with_a_llama3_template_from_the_config(tmp_path: Path) -> None:
    tokenizer = chat_tokenizer(WORDS, template=None)
    turns = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "what is two plus two"},
             {"from": "gpt", "value": "four"}]
    [example] = _examples([{"conversations": turns}], tmp_path, tokenizer, template=LLAMA3)
    header = ["<|start_header_id|>", "<|end_header_id|>"]
    assert _marked(example, tokenizer) == [
        "[BOS]", header[0], "system", header[1], "be", "brief", "<|eot_id|>",
        header[0], "user", header[1], "what", "is", "two", "plus", "two", "<|eot_id|>",
        header[0], "assistant", header[1], "+four", "+<|eot_id|>",
    ]


def test_truncation_cuts_ids_and_labels_together(tmp_path: Path) -> None:
    tokenizer = chat_tokenizer(WORDS)
    [whole] = _examples([{"messages": [ASK, ANSWER]}], tmp_path, tokenizer)
    [cut] = _examples([{"messages": [ASK, ANSWER]}], tmp_path, tokenizer, max_length=11)
    assert cut == TokenizedExample(whole.input_ids[:11], whole.labels[:11])
    assert cut.labels[-1] != IGNORE_INDEX
    assert "no assistant token is left" in _error(
        lambda: _examples([{"messages": [ASK, ANSWER]}], tmp_path, tokenizer, max_length=9))


@pytest.mark.parametrize(("turn", "message"), [
    ({"role": "robot", "content": "four"}, r"row 2 turn 2: role 'robot' is not one of system, user"),
    ({"role": "assistant"}, r"row 2 turn 2: no text content \(got None\); give the turn a 'content'"),
    ({"from": "gpt", "value": 4}, r"row 2 turn 2: no text content \(got 4\)"),
])
def test_a_bad_turn_is_one_line_naming_the_row_and_turn(turn: dict[str, Any], message: str,
                                                        tmp_path: Path) -> None:
    rows = [{"messages": [ASK, ANSWER]}, {"messages": [ASK, turn]}]
    assert re.search(message, _error(lambda: _examples(rows, tmp_path)))


def test_rows_without_an_answer_or_turns_are_errors(tmp_path: Path) -> None:
    assert "row 1 has no assistant turn" in _error(lambda: _examples([{"messages": [ASK]}], tmp_path))
    rows = [{"messages": [ASK, ANSWER]}, {"text": "hi"}]
    assert "row 2: no 'messages' field (it has: text)" in _error(lambda: _examples(rows, tmp_path))
    sharegpt = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hi"}]
    rows = [{"conversations": sharegpt}, {"messages": [ASK, ANSWER], "conversations": sharegpt}]
    message = _error(lambda: _examples(rows, tmp_path))
    assert "row 2: more than one 'messages' or 'conversations' field" in message


def test_a_file_may_mix_both_spellings(tmp_path: Path) -> None:
    tokenizer = chat_tokenizer(WORDS)
    sharegpt = [{"from": "human", "value": "what is two plus two"}, {"from": "gpt", "value": "four"}]
    mixed = _examples([{"messages": [ASK, ANSWER]}, {"conversations": sharegpt}], tmp_path, tokenizer)
    assert mixed[0] == mixed[1] and _marked(mixed[1], tokenizer)[-2:] == ["+four", "+<|im_end|>"]


def test_a_template_that_cannot_render_the_row_names_it(tmp_path: Path) -> None:
    strict = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
              "{{ m['content'] + '\\n' }}{% endfor %}")
    rows = [{"messages": [ASK, ANSWER]}, {"messages": [SYSTEM, ASK, ANSWER]}]
    message = _error(lambda: _examples(rows, tmp_path, template=strict))
    assert "data.train: " in message and "row 2: the chat template cannot render this conversation " \
        "(Conversation roles must alternate user/assistant)" in message


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path: Path) -> None:
    # Numbers each turn from the end: the rendering of a prefix is not a prefix of the whole.
    backwards = ("{% for m in messages %}{{ (messages | length - loop.index0) ~ ' ' ~ m['content'] }} "
                 "{% endfor %}")
    message = _error(lambda: _examples([{"messages": [ASK, ANSWER]}], tmp_path, template=backwards))
    assert "row 1 turn 2: the chat template renders the conversation up to this assistant turn " \
        "differently" in message


def test_a_tokenizer_without_a_template_needs_one_in_the_config(tmp_path: Path) -> None:
    message = _error(lambda: _examples([{"messages": [ASK, ANSWER]}], tmp_path, chat_tokenizer(WORDS, None)))
    assert "has no chat template; set data.chat_template" in message


def test_the_config_takes_a_template_file_and_a_messages_field(tmp_path: Path) -> None:
    (tmp_path / "chatml.jinja").write_text(CHATML)
    assert read_template(str(tmp_path / "chatml.jinja")) == CHATML
    assert read_template(CHATML) == CHATML and read_template(None) is None
    assert "neither a file nor a Jinja template" in _error(lambda: read_template(str(tmp_path / "no.jinja")))
    write_jsonl(tmp_path / "train.jsonl", [{"dialog": [ASK, ANSWER]}])
    raw = {"task": "causal_lm", "data": {"train": str(tmp_path / "train.jsonl"), "messages_field": "dialog",
                                         "chat_template": str(tmp_path / "chatml.jinja")}}
    rows = load_rows(from_dict(raw))
    tokenizer = chat_tokenizer(WORDS, template=None)
    [example] = tokenize(rows, from_dict(raw), tokenizer).train
    assert _marked(example, tokenizer)[-3:] == ["assistant", "+four", "+<|im_end|>"]
    raw["data"]["messages_field"] = "turns"
    assert "has no 'turns' column" in _error(lambda: load_rows(from_dict(raw)))


def test_chat_rows_need_task_causal_lm(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"messages": [ASK, ANSWER]}])
    raw = {"task": "seq2seq", "data": {"train": str(tmp_path / "train.jsonl")}}
    assert "holds chat rows ('messages' column), which task causal_lm trains" in _error(
        lambda: load_rows(from_dict(raw)))


def test_a_template_that_drops_the_answers_is_an_error(tmp_path: Path) -> None:
    silent = ("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}"
              "{% endfor %}")
    message = _error(lambda: _examples([{"messages": [ASK, ANSWER]}], tmp_path, template=silent))
    assert "row 1: the chat template renders the assistant turns as no tokens" in message


def test_chat_settings_without_chat_rows_are_errors(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "hi", "completion": "hi"}])
    raw = {"task": "causal_lm", "data": {"train": str(tmp_path / "train.jsonl"), "chat_template": CHATML}}
    assert "data.chat_template applies to chat rows" in _error(lambda: load_rows(from_dict(raw)))


def test_other_tasks_ignore_a_messages_column_beside_their_fields(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": "hi", "label": "a", "messages": [ASK, ANSWER]}])
    raw = {"task": "sequence_classification", "data": {"train": str(tmp_path / "train.jsonl")}}
    assert load_rows(from_dict(raw)).labels == ["a"]


def test_a_tokenizer_that_adds_bos_gets_one_bos_from_a_template_that_writes_it(tmp_path: Path) -> None:
    tokenizer = word_tokenizer(["system user assistant", *WORDS])  # "[BOS] $A", like Llama's
    tokenizer.add_tokens(list(CHAT_SPECIALS), special_tokens=True)
    [example] = _examples([{"messages": [ASK, ANSWER]}], tmp_path, tokenizer, template=LLAMA3)
    assert _marked(example, tokenizer)[:2] == ["[BOS]", "<|start_header_id|>"]
    assert example.input_ids.count(tokenizer.bos_token_id) == 1


def test_packing_keeps_chat_labels_with_their_tokens(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"messages": [ASK, ANSWER]}] * 3)
    raw = {"task": "causal_lm", "model": {"max_length": 30},
           "data": {"train": str(tmp_path / "train.jsonl"), "packing": True}}
    tokenizer = chat_tokenizer(WORDS)
    rows = tokenize(load_rows(from_dict(raw)), from_dict(raw), tokenizer).train
    whole = _examples([{"messages": [ASK, ANSWER]}], tmp_path, tokenizer)[0]
    # Two whole conversations of 12 tokens fit a row of 30, the third starts another; none is cut.
    assert len(whole.input_ids) == 12 and [r.segments for r in rows] == [(12, 12), (12,)]
    assert [r.input_ids for r in rows] == [whole.input_ids * 2, whole.input_ids]
    alone = (IGNORE_INDEX, *whole.labels[1:])  # a row's first label is never predicted
    assert [r.labels for r in rows] == [alone * 2, alone]
