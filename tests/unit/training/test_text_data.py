"""The user's own data for ``deltadist train``: loading, row checks and tokenizing
(packing: tests/unit/training/test_packing.py).

Tokenizers are :func:`tests.text_tasks.word_tokenizer` ones, whose ids are fixed by the corpus:
specials 0-3 (``[PAD] [UNK] [BOS] [EOS]``), then words in order of first appearance.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Callable

import datasets
import pytest

from deltadist.errors import ConfigError
from deltadist.training.data_files import load_split
from deltadist.training.text_data import (
    IGNORE_INDEX,
    TokenizedExample,
    label_names,
    tokenize_split,
)
from tests.text_tasks import BOS, CLS, EOS, SEP, bert_style_tokenizer, word_tokenizer, write_jsonl

X = IGNORE_INDEX
CORPUS = ["what is two plus two four hello world"]
WHAT, IS, TWO, PLUS, FOUR, HELLO, WORLD = range(4, 11)
"""Word ids of every tokenizer built from CORPUS."""
QA = {"prompt": "what is two plus two", "completion": "four"}
HELLO_WORLD = {"text": "hello world"}


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets an empty datasets cache (datasets reads the setting when it loads)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))


def _jsonl(tmp_path: Path, rows: list[dict[str, Any]], name: str = "train.jsonl") -> str:
    path = str(tmp_path / name)
    write_jsonl(path, rows)
    return path


def _error(call: Callable[[], object]) -> str:
    """The message of the ConfigError ``call`` raises, checked to be one line."""
    with pytest.raises(ConfigError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def _tokenize(rows: list[dict[str, Any]], tmp_path: Path, task: str, tokenizer: Any,
              max_length: int = 64, labels: list[str] | None = None) -> list[TokenizedExample]:
    path = _jsonl(tmp_path, rows)
    return tokenize_split(load_split(path, "data.train"), task, tokenizer, max_length, labels, path,
                          "data.train")


# --- loading -------------------------------------------------------------------------------------

ROWS = [{"prompt": "a b", "completion": "4"}, {"prompt": "c", "completion": "d e"}]


def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


WRITERS: dict[str, Callable[[str, list[dict[str, Any]]], None]] = {
    "train.jsonl": write_jsonl,
    "train.json": lambda path, rows: Path(path).write_text(json.dumps(rows)),
    "train.csv": _write_csv,
    "train.parquet": lambda path, rows: datasets.Dataset.from_list(rows).to_parquet(path),
    "saved": lambda path, rows: datasets.Dataset.from_list(rows).save_to_disk(path),
    "saved_dict": lambda path, rows: datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows)}).save_to_disk(path),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_format_loads_the_same_rows(tmp_path: Path, name: str) -> None:
    path = str(tmp_path / name)
    WRITERS[name](path, ROWS)
    dataset = load_split(path, "data.train")
    assert dataset.column_names == ["prompt", "completion"]
    assert dataset[:] == {"prompt": ["a b", "c"], "completion": ["4", "d e"]}


def test_csv_text_columns_stay_text_when_they_look_like_numbers(tmp_path: Path) -> None:
    path = str(tmp_path / "train.csv")
    _write_csv(path, [{"prompt": "2+2=", "completion": "4", "text": None, "label": 1},
                      {"prompt": None, "completion": None, "text": "12", "label": 0}])
    assert load_split(path, "data.train")[:] == {
        "prompt": ["2+2=", None], "completion": ["4", None], "text": [None, "12"], "label": [1, 0]}


def test_a_saved_dataset_dict_gives_the_split_of_the_key(tmp_path: Path) -> None:
    def split(*texts: str) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"text": list(texts)})

    both = str(tmp_path / "both")
    datasets.DatasetDict({"train": split("t1", "t2"), "validation": split("v1")}).save_to_disk(both)
    assert load_split(both, "data.train")["text"][:] == ["t1", "t2"]
    assert load_split(both, "data.eval")["text"][:] == ["v1"]
    assert load_split(os.path.join(both, "validation"), "data.train")["text"][:] == ["v1"]

    other = str(tmp_path / "other")
    datasets.DatasetDict({"a": split("a1"), "b": split("b1")}).save_to_disk(other)
    assert _error(lambda: load_split(other, "data.eval")) == (
        f"data.eval: {other} is a DatasetDict with splits a, b and none is the eval split; point "
        f"data.eval at one split's folder, e.g. {os.path.join(other, 'a')}."
    )


def test_an_edited_file_is_read_again(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"text": "one"}])
    assert load_split(path, "data.train")["text"][:] == ["one"]
    stat = os.stat(path)
    write_jsonl(path, [{"text": "two"}])  # same size, and the old mtime put back:
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # datasets alone would serve "one"
    assert load_split(path, "data.train")["text"][:] == ["two"]
    write_jsonl(path, [{"text": "three"}, {"text": "four"}])
    assert load_split(path, "data.train")["text"][:] == ["three", "four"]


def test_loading_prints_nothing_and_restores_progress_bars(tmp_path: Path,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    path = _jsonl(tmp_path, [{"text": "one"}])
    datasets.enable_progress_bars()
    capfd.readouterr()
    load_split(path, "data.train")
    assert capfd.readouterr() == ("", "")
    assert not datasets.utils.are_progress_bars_disabled()


def test_a_missing_file_names_key_path_and_fix(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.jsonl")
    assert _error(lambda: load_split(path, "data.train")) == (
        f"data.train: {path} does not exist; check the path (relative paths are from the directory "
        "you run deltadist train in)."
    )


FORMATS = ("a .jsonl, .json, .csv or .parquet file, or a folder written by Dataset.save_to_disk")


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("train.txt", b"hello", "has an unknown format (.txt); use " + FORMATS + "."),
    ("train", b"hello", "has an unknown format (no extension); use " + FORMATS + "."),
    ("train.jsonl", b'{"text": "a"\n', "line 1 is not valid JSON (Expecting ',' delimiter at column 13); "
                                        "fix that line."),
    ("train.jsonl", bytes(range(256)), "could not be read as JSON Lines or a JSON array of objects ("),
    ("train.parquet", b'{"text": "a"}\n', "could not be read as Parquet ("),
    ("train.jsonl", b"", "holds no rows; add rows to it, or point data.train at a file that has them."),
    ("train.json", b"[]", "holds no rows; add rows to it, or point data.train at a file that has them."),
    ("train.csv", b"text,label\n", "holds no rows; add rows to it, or point data.train at a file that has"),
])
def test_unreadable_or_empty_files_are_one_line_errors(tmp_path: Path, name: str, content: bytes,
                                                       expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    message = _error(lambda: load_split(str(path), "data.train"))
    assert message.startswith(f"data.train: {path} {expected}")
    if "could not be read" in expected:
        assert message.endswith(f"; fix the file, or save it as {FORMATS}.")


def test_a_folder_that_is_no_saved_dataset_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "a"}])
    assert _error(lambda: load_split(str(folder), "data.eval")) == (
        f"data.eval: {folder} is a folder but not a saved dataset (no state.json or dataset_dict.json, "
        f"which save_to_disk writes); point data.eval at {FORMATS}."
    )


def test_an_empty_saved_dataset_is_an_error(tmp_path: Path) -> None:
    folder = str(tmp_path / "saved")
    datasets.Dataset.from_dict({"text": []}).save_to_disk(folder)
    # "holds no rows", or where datasets cannot load a saved dataset of 0 shards (5.x), "could not be read".
    assert _error(lambda: load_split(folder, "data.eval")).startswith(f"data.eval: {folder} ")


# --- causal_lm -----------------------------------------------------------------------------------

def test_causal_lm_masks_the_prompt_and_appends_eos(tmp_path: Path) -> None:
    examples = _tokenize([QA, HELLO_WORLD], tmp_path, "causal_lm", word_tokenizer(CORPUS))
    assert examples == [
        TokenizedExample((BOS, WHAT, IS, TWO, PLUS, TWO, FOUR, EOS), (X, X, X, X, X, X, FOUR, EOS)),
        TokenizedExample((BOS, HELLO, WORLD, EOS), (BOS, HELLO, WORLD, EOS)),
    ]


def test_causal_lm_without_bos_and_with_the_tokenizers_own_eos(tmp_path: Path) -> None:
    gpt2_like = _tokenize([QA], tmp_path, "causal_lm", word_tokenizer(CORPUS, template="$A"))
    assert gpt2_like == [TokenizedExample((WHAT, IS, TWO, PLUS, TWO, FOUR, EOS), (X, X, X, X, X, FOUR, EOS))]
    # A tokenizer that already ends a text with eos gets no second one.
    t5_like = _tokenize([HELLO_WORLD], tmp_path, "causal_lm", word_tokenizer(CORPUS, template="$A [EOS]"))
    assert t5_like == [TokenizedExample((HELLO, WORLD, EOS), (HELLO, WORLD, EOS))]


def test_causal_lm_with_a_bert_style_tokenizer_masks_cls_and_sep(tmp_path: Path) -> None:
    examples = _tokenize([QA, HELLO_WORLD], tmp_path, "causal_lm", bert_style_tokenizer(CORPUS))
    assert examples == [  # no eos token, so nothing is appended
        TokenizedExample((CLS, WHAT, IS, TWO, PLUS, TWO, SEP, FOUR), (X, X, X, X, X, X, X, FOUR)),
        TokenizedExample((CLS, HELLO, WORLD, SEP), (CLS, HELLO, WORLD, SEP)),
    ]


def test_causal_lm_truncation_keeps_the_start(tmp_path: Path) -> None:
    short = {"prompt": "two", "completion": "four four"}
    examples = _tokenize([QA, short, HELLO_WORLD], tmp_path, "causal_lm", word_tokenizer(CORPUS),
                         max_length=7)
    assert examples == [
        TokenizedExample((BOS, WHAT, IS, TWO, PLUS, TWO, FOUR), (X, X, X, X, X, X, FOUR)),
        TokenizedExample((BOS, TWO, FOUR, FOUR, EOS), (X, X, FOUR, FOUR, EOS)),
        TokenizedExample((BOS, HELLO, WORLD, EOS), (BOS, HELLO, WORLD, EOS)),
    ]


def test_rows_that_lose_their_completion_are_counted(tmp_path: Path) -> None:
    short = {"prompt": "two", "completion": "four"}
    path = str(tmp_path / "train.jsonl")
    with pytest.warns(UserWarning) as caught:
        examples = _tokenize([QA, short], tmp_path, "causal_lm", word_tokenizer(CORPUS), max_length=4)
    assert [str(w.message) for w in caught] == [
        f"data.train: in 1 of 2 prompt/completion rows of {path} the prompt fills model.max_length "
        "(4 tokens), so they add no loss; raise model.max_length to learn from them."
    ]
    assert examples == [
        TokenizedExample((BOS, WHAT, IS, TWO), (X, X, X, X)),
        TokenizedExample((BOS, TWO, FOUR, EOS), (X, X, FOUR, EOS)),
    ]


def test_every_completion_truncated_away_is_an_error(tmp_path: Path) -> None:
    path = str(tmp_path / "train.jsonl")
    message = _error(lambda: _tokenize([QA, {"prompt": "what is two", "completion": "four"}, HELLO_WORLD],
                                       tmp_path, "causal_lm", word_tokenizer(CORPUS), max_length=3))
    assert message == (
        f"data.train: every prompt of {path} fills model.max_length (3 tokens; the longest prompt has 6), "
        "so no completion token is left to learn; raise model.max_length or shorten the prompts."
    )


# --- seq2seq -------------------------------------------------------------------------------------

def test_seq2seq_sources_and_targets(tmp_path: Path) -> None:
    t5_like = word_tokenizer(CORPUS, template="$A [EOS]")
    assert _tokenize([QA, HELLO_WORLD], tmp_path, "seq2seq", t5_like) == [
        TokenizedExample((WHAT, IS, TWO, PLUS, TWO, EOS), (FOUR, EOS)),
        TokenizedExample((EOS,), (HELLO, WORLD, EOS)),  # a text row: the encoding of "" as source
    ]
    # The tokenizer truncates, keeping its special tokens.
    assert _tokenize([QA, HELLO_WORLD], tmp_path, "seq2seq", t5_like, max_length=2) == [
        TokenizedExample((WHAT, EOS), (FOUR, EOS)),
        TokenizedExample((EOS,), (HELLO, EOS)),
    ]
    llama_like = word_tokenizer(CORPUS)
    assert _tokenize([HELLO_WORLD], tmp_path, "seq2seq", llama_like) == [
        TokenizedExample((BOS,), (BOS, HELLO, WORLD))
    ]


def test_seq2seq_text_rows_need_a_nonempty_empty_source(tmp_path: Path) -> None:
    path = str(tmp_path / "train.jsonl")
    message = _error(lambda: _tokenize([QA, HELLO_WORLD], tmp_path, "seq2seq",
                                       word_tokenizer(CORPUS, template="$A")))
    assert message == (
        f"data.train: {path} row 2 is a text row, but the tokenizer encodes an empty source as no "
        "tokens at all; give seq2seq rows a prompt and completion."
    )


# --- rows of the wrong shape ---------------------------------------------------------------------

@pytest.mark.parametrize(("rows", "expected"), [
    ([QA, {"prompt": "two", "answer": "four"}],
     "row 2: no 'completion' field (it has: prompt, answer); causal_lm rows need prompt and completion, "
     "or text."),
    ([QA, {"prompt": None, "completion": "four"}],
     "row 2: no 'prompt' field (it has: completion); causal_lm rows need prompt and completion, or text."),
    ([HELLO_WORLD, QA, {"note": "x"}],
     "row 3: no prompt/completion or 'text' field (it has: note); causal_lm rows need prompt and "
     "completion, or text."),
    ([QA, {**QA, "text": "hello"}],
     "row 2 has both text and prompt/completion; give each row either prompt and completion, or text."),
    ([{"prompt": "two", "completion": 4}],  # only ints: datasets < 5 cannot load mixed columns
     "row 1: 'completion' must be a string, got int 4; write it as a quoted string."),
    ([QA, HELLO_WORLD, {"prompt": " ", "completion": "four"}],
     "row 3: 'prompt' is empty; give it text or remove the row."),
    ([{"text": ""}], "row 1: 'text' is empty; give it text or remove the row."),
    ([{"question": "what", "answer": "four"}],
     "has no prompt/completion or text columns (it has: question, answer); causal_lm rows need prompt "
     "and completion, or text (or chat rows: messages or conversations)."),
    ([{"prompt": "what", "answer": "four"}],
     "has no 'completion' column (nor 'text') (it has: prompt, answer); causal_lm rows need prompt and "
     "completion, or text (or chat rows: messages or conversations)."),
])
def test_bad_rows_are_one_line_errors_before_any_tokenizing(tmp_path: Path, rows: list[dict[str, Any]],
                                                           expected: str) -> None:
    path = _jsonl(tmp_path, rows)
    dataset = load_split(path, "data.train")
    # No tokenizer at all: the rows must be refused before one is used.
    message = _error(lambda: tokenize_split(dataset, "causal_lm", None, 64, None, path, "data.train"))
    assert message == f"data.train: {path} {expected}"


def test_seq2seq_errors_name_their_task(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"prompt": "what"}], name="eval.jsonl")
    message = _error(lambda: tokenize_split(load_split(path, "data.eval"), "seq2seq", None, 64, None, path,
                                            "data.eval"))
    assert message == (
        f"data.eval: {path} has no 'completion' column (nor 'text') (it has: prompt); seq2seq rows need "
        "prompt and completion, or text."
    )


# --- sequence_classification ---------------------------------------------------------------------

def _split(rows: list[dict[str, Any]], tmp_path: Path, name: str = "train.jsonl") -> tuple[Any, str]:
    path = _jsonl(tmp_path, rows, name)
    return load_split(path, "data.train"), path


def test_label_names_of_string_int_and_configured_labels(tmp_path: Path) -> None:
    strings, _ = _split([{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"},
                         {"text": "c", "label": "pos"}], tmp_path)
    assert label_names(strings, "x") == ["neg", "pos"]
    ints, _ = _split([{"text": "a", "label": 2}, {"text": "b", "label": 0}], tmp_path)
    assert label_names(ints, "x") == ["0", "1", "2"]
    assert label_names(strings, "x", ["pos", "neg", "other"]) == ["pos", "neg", "other"]
    assert label_names(ints, "x", ["a", "b", "c"]) == ["a", "b", "c"]


@pytest.mark.parametrize(("rows", "configured", "expected"), [
    ([{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}], ["neg", "pos"],
     "row 2: label 'meh' is not a known class (known: neg, pos, from the configured labels); fix the row or "
     "add the class to the configured labels."),
    ([{"text": "a", "label": 1}, {"text": "b", "label": 2}], ["neg", "pos"],
     "row 2: label 2 is out of range: the configured labels name 2 classes (indices 0-1); fix the row."),
    ([{"text": "a", "label": 1}, {"text": "b", "label": None}], None,
     "row 2: no 'label'; give every row a label (a class name or an int index)."),
    ([{"text": "a", "label": True}], None,
     "row 1: label True is a bool; labels are class names (strings) or class indices (ints from 0)."),
    ([{"text": "a", "label": 0.5}], None,
     "row 1: label 0.5 is a float; labels are class names (strings) or class indices (ints from 0)."),
    ([{"text": "a", "label": 0}, {"text": "a", "label": -1}], None,
     "row 2: label -1 is negative; class indices count from 0."),
    ([{"text": "a"}], None,
     "has no 'label' column (it has: text); sequence_classification rows need text and label."),
])
def test_bad_labels_name_the_file_and_row(tmp_path: Path, rows: list[dict[str, Any]],
                                          configured: list[str] | None, expected: str) -> None:
    dataset, path = _split(rows, tmp_path)
    assert _error(lambda: label_names(dataset, path, configured)) == f"{path} {expected}"


def test_classification_ids_and_class_indices(tmp_path: Path) -> None:
    tokenizer = word_tokenizer(CORPUS)
    rows = [{"text": "hello world", "label": "b"}, {"text": "two plus two", "label": "a"}]
    dataset, path = _split(rows, tmp_path)
    names = label_names(dataset, path)
    assert tokenize_split(dataset, "sequence_classification", tokenizer, 3, names, path, "data.train") == [
        TokenizedExample((BOS, HELLO, WORLD), (1,)),
        TokenizedExample((BOS, TWO, PLUS), (0,)),  # cut to max_length=3
    ]
    ints, path = _split([{"text": "four", "label": 1}], tmp_path, "eval.jsonl")
    assert tokenize_split(ints, "sequence_classification", tokenizer, 8, names, path, "data.eval") == [
        TokenizedExample((BOS, FOUR), (1,))
    ]


def test_classification_rows_with_unknown_labels_or_no_text_are_errors(tmp_path: Path) -> None:
    eval_set, path = _split([{"text": "a", "label": "a"}, {"text": "b", "label": "c"}], tmp_path,
                            "eval.jsonl")
    assert _error(lambda: tokenize_split(eval_set, "sequence_classification", None, 8, ["a", "b"], path,
                                         "data.eval")) == (
        f"data.eval: {path} row 2: label 'c' is not a known class (known: a, b, from the configured labels "
        "or those of data.train); fix the row or add the class to the configured labels or those of "
        "data.train."
    )
    no_text, path = _split([{"text": "a", "label": "a"}, {"sentence": "b", "label": "b"}], tmp_path)
    assert _error(lambda: tokenize_split(no_text, "sequence_classification", None, 8, ["a", "b"], path,
                                         "data.train")) == (
        f"data.train: {path} row 2: no 'text' field (it has: label, sentence); sequence_classification "
        "rows need text and label."
    )
