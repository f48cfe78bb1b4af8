"""Where ``deltadist train``'s rows come from: cached dataset names (offline), column mappings, and
several training sources mixed by weight."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable

import datasets
import huggingface_hub
import pytest
import torch

from deltadist.errors import ConfigError
from deltadist.training.config import from_dict
from deltadist.training.data_files import load_split
from deltadist.training.job_data import load_rows
from deltadist.training.sources import Mixture, map_columns
from tests.text_tasks import cache_dataset, write_jsonl

QA = [{"question": "what is two", "answer": "two"}, {"question": "hello", "answer": "world"}]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline datasets cache of its own holding ``user/qa`` (train: 2 rows, validation: 1)."""
    folder = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(folder))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache_dataset(folder, "user/qa", {"train": QA, "validation": QA[:1]})
    return folder


def _error(call: Callable[[], object]) -> str:
    with pytest.raises(ConfigError) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


# --- datasets names --------------------------------------------------------------------------------

def test_a_cached_dataset_name_loads_the_split_of_the_key(cache: Path) -> None:
    assert load_split("user/qa", "data.train")[:] == {"question": ["what is two", "hello"],
                                                       "answer": ["two", "world"]}
    assert load_split("user/qa", "data.eval")["question"][:] == ["what is two"]  # validation
    assert load_split("user/qa:validation", "data.train").num_rows == 1
    assert load_split("user/qa:train[1:]", "data.train")["answer"][:] == ["world"]  # datasets' slicing


def test_a_name_not_in_the_cache_says_how_to_cache_it(cache: Path) -> None:
    assert _error(lambda: load_split("user/other", "data.train")) == (
        f"data.train: user/other is no file or folder, and no dataset 'user/other' is in the local datasets "
        f"cache ({cache}); cache it once online with datasets.load_dataset('user/other'), or save_to_disk "
        "it and point data.train at that folder, or fix the path.")
    assert _error(lambda: load_split("user/qa:test", "data.train")).startswith(
        "data.train: user/qa:test could not be loaded from the datasets cache (Unknown split \"test\"")
    assert _error(lambda: load_split("user/qa", "data.train", config="big")).startswith(
        "data.train: user/qa could not be loaded from the datasets cache (Couldn't find cache for user/qa "
        "for config 'big'")


def test_a_missing_file_is_still_a_missing_file(cache: Path, tmp_path: Path) -> None:
    for path in ("train.jsonl", str(tmp_path / "rows"), "./rows"):
        assert _error(lambda: load_split(path, "data.train")).startswith(f"data.train: {path} does not exist")


# --- glob patterns ---------------------------------------------------------------------------------

def test_a_pattern_reads_its_files_one_after_another_in_sorted_order(cache: Path, tmp_path: Path) -> None:
    for index in (2, 0, 1):
        write_jsonl(tmp_path / f"train-{index}.jsonl", [{"text": f"{index}.{n}"} for n in range(2)])
    write_jsonl(tmp_path / "eval-0.jsonl", [{"text": "not a training row"}])
    rows = load_split(str(tmp_path / "train-*.jsonl"), "data.train")
    assert rows["text"][:] == ["0.0", "0.1", "1.0", "1.1", "2.0", "2.1"]
    rows = load_rows(_job(tmp_path, {"train": str(tmp_path / "train-[01].jsonl")})).train[0].dataset
    assert rows["text"][:] == ["0.0", "0.1", "1.0", "1.1"]


def test_a_pattern_needs_files_of_one_kind_with_the_same_columns(cache: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "x", "label": "y"}])
    assert _error(lambda: load_split(str(tmp_path / "*.jsonl"), "data.train")) == (
        f"data.train: {tmp_path / 'b.jsonl'} holds other columns than {tmp_path / 'a.jsonl'} (text: string, "
        f"label: string vs text: string); the files {tmp_path / '*.jsonl'} matches must hold the same "
        "columns.")
    (tmp_path / "c.txt").write_text("x")
    assert _error(lambda: load_split(str(tmp_path / "[ac].*"), "data.train")) == (
        f"data.train: the pattern {tmp_path / '[ac].*'} matches .jsonl, .txt files; make it match files of "
        f"one kind, one of .jsonl, .json, .csv, .parquet (e.g. {tmp_path / '[ac]'}.jsonl).")
    assert _error(lambda: load_split(str(tmp_path / "none-*.csv"), "data.eval")) == (
        f"data.eval: the pattern {tmp_path / 'none-*.csv'} matches no file; fix the pattern (relative paths "
        "are from the directory you run in).")


# --- column mapping --------------------------------------------------------------------------------

def _job(tmp_path: Path, data: dict[str, Any], task: str = "causal_lm") -> Any:
    return from_dict({"task": task, "data": data})


def test_columns_map_the_users_names_onto_the_fields(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "qa.jsonl"
    write_jsonl(path, [{**row, "prompt": "ignored"} for row in QA])
    rows = load_rows(_job(tmp_path, {"train": str(path), "columns": {"prompt": "question",
                                                                     "completion": "answer"}}))
    assert rows.train[0].dataset[:] == {"prompt": ["what is two", "hello"], "completion": ["two", "world"]}
    write_jsonl(path, [{"question": "q", "answer": ""}])
    assert _error(lambda: load_rows(_job(tmp_path, {"train": str(path), "columns": {
        "prompt": "question", "completion": "answer"}}))) == (
        f"data.train: {path} (question as prompt, answer as completion) row 1: 'completion' is empty; "
        "give it text or remove the row.")
    query = {"train": str(path), "columns": {"prompt": "query"}}
    assert _error(lambda: load_rows(_job(tmp_path, query))) == (
        f"data.train: {path} has no 'query' column, which the column mapping gives as prompt (it has: "
        "question, answer); fix the mapping.")


def test_each_source_maps_its_own_columns(tmp_path: Path, cache: Path) -> None:
    plain = tmp_path / "plain.jsonl"
    write_jsonl(plain, [{"prompt": "a", "answer": "b"}])
    qa = {"prompt": "question"}
    rows = load_rows(_job(tmp_path, {"train": [str(plain), {"path": "user/qa", "weight": 3, "columns": qa}],
                                     "eval": [{"path": "user/qa:validation", "columns": qa}],
                                     "columns": {"completion": "answer"}}))
    assert [p.key for p in rows.train] == ["data.train[0]", "data.train[1]"]
    assert [p.source.weight for p in rows.train] == [1.0, 3.0]
    assert [p.dataset.column_names for p in rows.train + rows.eval] == [["prompt", "completion"]] * 3
    assert rows.counts() == (3, 1)


def test_map_columns_keeps_a_dataset_without_a_mapping() -> None:
    dataset = datasets.Dataset.from_list([{"text": "a"}])
    assert map_columns(dataset, {"text": "text"}, "x.jsonl", "data.train") == (dataset, "x.jsonl")


@pytest.mark.parametrize(("data", "message"), [
    ({"train": [{"path": "a.jsonl", "weight": -1}]}, "data.train[0].weight must be a positive number"),
    ({"train": [{"path": "a.jsonl", "share": 1}]}, "data.train[0]: unknown key(s) share; a source takes"),
    ({"train": []}, "data.train is an empty list;"),
    ({"train": 3}, "data.train must be of type str or list, got 3."),
    ({"columns": {"question": "prompt"}}, "data.columns: 'question' is not a field; map prompt, completion"),
    ({"train": [{"path": "a", "columns": {"label": 1}}]}, "data.train[0].columns.label must be a column"),
    ({"train": "a.jsonl", "eval": [{"path": "b.jsonl", "weight": 2}]}, "data.eval: weights mix training"),
    ({"train": ["builtin:topics", "a.jsonl"]}, "data.train: builtin:topics is data.train alone"),
])
def test_bad_sources_are_config_errors(data: dict[str, Any], message: str) -> None:
    assert _error(lambda: from_dict({"data": data})).startswith(message)


# --- mixing --------------------------------------------------------------------------------------

def test_an_epoch_draws_each_source_by_its_weight() -> None:
    mixture = Mixture(sizes=(100, 10, 30), weights=(1.0, 2.0, 1.0))
    assert mixture.counts() == [35, 70, 35]  # 140 examples split 1:2:1
    order = mixture.draw(torch.Generator().manual_seed(0))
    assert len(order) == 140
    drawn = Counter(order)
    by_source = [sum(drawn[i] for i in range(a, b)) for a, b in ((0, 100), (100, 110), (110, 140))]
    assert by_source == [35, 70, 35]
    assert all(drawn[i] <= 1 for i in range(100))  # enough rows: without replacement
    assert all(drawn[i] == 7 for i in range(100, 110))  # too few: each row 70 / 10 times
    third = [drawn[i] for i in range(110, 140)]  # 35 of 30: each once, 5 drawn twice
    assert set(third) == {1, 2} and third.count(2) == 5


def test_the_draw_is_a_function_of_the_generator_and_differs_by_epoch() -> None:
    mixture = Mixture(sizes=(50, 7), weights=(1.0, 1.5))

    def draw(seed: int) -> list[int]:
        return mixture.draw(torch.Generator().manual_seed(seed))

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    assert sorted(set(draw(3)) & set(range(50))) != sorted(set(draw(4)) & set(range(50)))  # fresh subsets


def test_shares_round_by_largest_remainder() -> None:
    assert Mixture((5, 5, 5), (1.0, 1.0, 1.0)).counts() == [5, 5, 5]
    assert Mixture((2, 2, 3), (1.0, 1.0, 1.0)).counts() == [3, 2, 2]  # 7/3 each: the first gets the extra
    assert Mixture((1, 9), (0.001, 1.0)).counts() == [0, 10]


def test_class_names_come_from_every_training_source(tmp_path: Path) -> None:
    first, second, indices = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    write_jsonl(first, [{"text": "x", "label": "good"}, {"text": "y", "label": "bad"}])
    write_jsonl(second, [{"sentence": "z", "label": "meh"}])
    write_jsonl(indices, [{"text": "z", "label": 2}])
    task = "sequence_classification"
    both = [str(first), {"path": str(second), "columns": {"text": "sentence"}}]
    assert load_rows(_job(tmp_path, {"train": both}, task)).labels == ["bad", "good", "meh"]
    assert _error(lambda: load_rows(_job(tmp_path, {"train": [str(first), str(indices)]}, task))) == (
        "data.train: some sources label rows with class names, others with int indices; use one kind in "
        "every source (or set data.labels).")
