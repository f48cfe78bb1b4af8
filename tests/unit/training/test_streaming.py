"""``data.streaming``: the training file read row by row, each rank its rows of every global batch,
from any step on; the loss normalised by the global batch's units summed over the ranks."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import datasets
import pytest

from deltadist.errors import ConfigError
from deltadist.training.batching import Collator, loss_units, micro_batches
from deltadist.training.config import from_dict
from deltadist.training.data_files import stream_rows
from deltadist.training.streaming import RowStream, buffer_shuffled
from deltadist.training.text_data import TokenizedExample
from tests.text_tasks import write_jsonl


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))


def _file(tmp_path: Path, count: int) -> str:
    path = str(tmp_path / "big.jsonl")
    write_jsonl(path, [{"text": f"row {n}"} for n in range(1, count + 1)])
    return path


def _steps(stream: RowStream, done: int, count: int) -> list[list[int]]:
    """The row numbers (in their files) of ``count`` steps after ``done``."""
    batches = stream.batches_after(done)
    return [[number for _, number in next(batches)[1]] for _ in range(count)]


def _shards(tmp_path: Path, sizes: tuple[int, ...]) -> str:
    """Files ``shards/train-0000i.jsonl`` with rows ``"i.n"``; the glob pattern of them."""
    (tmp_path / "shards").mkdir()
    for index, size in enumerate(sizes):
        write_jsonl(tmp_path / "shards" / f"train-{index:05d}.jsonl",
                    [{"text": f"{index}.{n}"} for n in range(1, size + 1)])
    return str(tmp_path / "shards" / "train-*.jsonl")


def _texts(stream: RowStream, done: int, count: int) -> list[str]:
    """The texts of this rank's rows of ``count`` steps after ``done``, in order."""
    batches = stream.batches_after(done)
    return [row["text"] for _ in range(count) for row in next(batches)[0]]


def test_each_rank_takes_every_world_size_th_row_of_the_file_repeated(tmp_path: Path) -> None:
    path = _file(tmp_path, 10)
    ranks = [RowStream(path, {}, rank, 2, batch_size=4) for rank in range(2)]
    assert _steps(ranks[0], 0, 3) == [[1, 3], [5, 7], [9, 1]]  # file rows; step 3 wraps to row 1
    assert _steps(ranks[1], 0, 3) == [[2, 4], [6, 8], [10, 2]]
    one = RowStream(path, {}, 0, 1, batch_size=4)
    for step, rows in enumerate(_steps(one, 0, 3)):  # one process: the same rows a step
        assert sorted(rows) == sorted(_steps(ranks[0], 0, 3)[step] + _steps(ranks[1], 0, 3)[step])
    rows, numbers = next(ranks[1].batches_after(0))
    assert rows == [{"text": "row 2"}, {"text": "row 4"}]


def test_a_resumed_stream_starts_at_the_row_after_the_last_step(tmp_path: Path) -> None:
    path = _file(tmp_path, 10)
    for rank in range(2):
        stream = RowStream(path, {}, rank, 2, batch_size=4)
        assert _steps(stream, 2, 2) == _steps(stream, 0, 4)[2:]


def test_the_file_is_read_lazily_and_a_broken_line_is_found_when_read(tmp_path: Path) -> None:
    """datasets parses JSON Lines 10 MB at a time: rows of the first block come before the broken
    line after it is read."""
    path = tmp_path / "big.jsonl"
    count = 120_000  # ~12 MB
    write_jsonl(path, [{"text": f"row {n} " + "x" * 90} for n in range(1, count + 1)])
    with open(path, "a") as file:
        file.write('{"text": "broken\n')
    rows = stream_rows(str(path), "data.train")
    assert next(rows)["text"].startswith("row 1 ")  # before the broken line is reached
    with pytest.raises(ConfigError) as caught:
        for _ in rows:
            pass
    assert str(caught.value).startswith(f"data.train: {path} could not be read after row ")
    assert 0 < int(str(caught.value).split("after row ")[1].split()[0]) <= count


def test_row_errors_name_the_row_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    write_jsonl(path, [{"question": "q", "answer": "a"}, {"question": "q", "answer": "a"},
                       {"question": "q", "answer": "a"}, {"question": "q", "answer": " "}])
    stream = RowStream(str(path), {"prompt": "question", "completion": "answer"}, 1, 2, batch_size=4)
    with pytest.raises(ConfigError) as caught:
        stream.check_first("causal_lm", None)
    assert str(caught.value) == (f"data.train: {path} (question as prompt, answer as completion) row 4: "
                                 "'completion' is empty; give it text or remove the row.")
    RowStream(str(path), {"prompt": "question", "completion": "answer"}, 0, 2, batch_size=4).check_first(
        "causal_lm", None)  # rank 0 holds rows 1 and 3 only


def test_own_rows_with_the_global_units_give_the_global_batchs_loss_scales() -> None:
    batch = [TokenizedExample((1,) * n, (1,) * n) for n in (3, 5, 2, 7, 4, 6, 2, 3)]
    collate = Collator("causal_lm", 0)
    units = sum(loss_units("causal_lm", e) for e in batch)
    for rank in range(2):
        whole = micro_batches(batch, "causal_lm", collate, rank, 2, 2)
        own = batch[rank * 4:(rank + 1) * 4]
        alone = micro_batches(own, "causal_lm", collate, rank, 2, 2, global_units=units)
        assert [m.loss_scale for m in alone] == [m.loss_scale for m in whole] == [2 / units] * 2
        assert all(a.inputs["input_ids"].equal(w.inputs["input_ids"]) for a, w in zip(alone, whole))


@pytest.mark.parametrize(("config", "message"), [
    ({"data": {"train": "a.jsonl", "streaming": True}}, "the run's length is training.max_steps; set it"),
    ({"data": {"train": ["a.jsonl", "b.jsonl"], "streaming": True}, "training": {"max_steps": 4}},
     "it reads one file or a glob pattern of files"),
    ({"data": {"train": "a.jsonl", "streaming": True, "packing": True}, "training": {"max_steps": 4}},
     "set data.packing and data.sort_by_length false"),
    ({"task": "sequence_classification", "data": {"train": "a.jsonl", "streaming": True},
      "training": {"max_steps": 4}}, "set data.labels"),
])
def test_streaming_needs_max_steps_one_file_and_read_order(config: dict[str, Any], message: str) -> None:
    config = {"task": "causal_lm", **config}
    with pytest.raises(ConfigError) as caught:
        from_dict(config)
    assert str(caught.value).startswith("data.streaming: ") and message in str(caught.value)
    assert str(caught.value).endswith(" (or data.streaming: false).")


def test_only_row_files_stream(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([{"text": "a"}]).save_to_disk(folder)
    with pytest.raises(ConfigError) as caught:
        next(stream_rows(str(folder), "data.train"))
    assert str(caught.value) == (
        f"data.train: {folder} is not a .jsonl, .csv or .parquet file; data.streaming reads one .jsonl, "
        ".csv or .parquet file row by row (set data.streaming: false for the other sources).")


def test_a_pattern_streams_its_files_in_sorted_order_and_errors_name_file_and_row(tmp_path: Path) -> None:
    pattern = _shards(tmp_path, (3, 2, 4))
    one = RowStream(pattern, {}, 0, 1, batch_size=3)
    assert _texts(one, 0, 4) == ["0.1", "0.2", "0.3", "1.1", "1.2", "2.1", "2.2", "2.3", "2.4",
                                 "0.1", "0.2", "0.3"]  # the files one after another, then again
    rows, ids = next(RowStream(pattern, {}, 1, 3, batch_size=3).batches_after(1))
    assert rows == [{"text": "1.2"}] and ids == [(str(tmp_path / "shards" / "train-00001.jsonl"), 2)]
    write_jsonl(tmp_path / "shards" / "train-00001.jsonl", [{"text": "ok"}, {"text": " "}])
    with pytest.raises(ConfigError) as caught:
        RowStream(pattern, {}, 0, 1, batch_size=6).check_first("causal_lm", None)
    assert str(caught.value).startswith(f"data.train: {tmp_path / 'shards' / 'train-00001.jsonl'} row 2: ")
    with pytest.raises(ConfigError, match=r"the pattern .*nothing-\*\.jsonl matches no file; fix the"):
        next(RowStream(str(tmp_path / "nothing-*.jsonl"), {}, 0, 1, batch_size=2).rows())
    (tmp_path / "shards" / "train-00009.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"matches \.json, \.jsonl files; make it match files of one kind, "
                                          r"one of \.jsonl, \.csv, \.parquet"):
        next(RowStream(pattern.replace(".jsonl", ".json*"), {}, 0, 1, batch_size=2).rows())


def test_buffer_shuffled_gives_every_item_once_within_the_buffer_s_reach() -> None:
    items = list(range(1000))
    assert list(buffer_shuffled(items, 1, random.Random(3))) == items  # one row held: nothing moves
    for size in (2, 16, 100, 5000):
        out = list(buffer_shuffled(items, size, random.Random(3)))
        assert sorted(out) == items
        # An item is given out only once `size` later items have come in, or at the end.
        assert all(position >= item - size for position, item in enumerate(out))
        assert out != items and list(buffer_shuffled(items, size, random.Random(3))) == out
    other_seed = list(buffer_shuffled(items, 16, random.Random(4)))
    assert other_seed != list(buffer_shuffled(items, 16, random.Random(3)))


def test_a_shuffled_stream_is_a_function_of_the_seed_and_the_pass_on_any_world_size(tmp_path: Path) -> None:
    pattern = _shards(tmp_path, (7, 5, 8))  # 20 rows a pass; steps of 4 rows
    one = RowStream(pattern, {}, 0, 1, batch_size=4, seed=1, shuffle_buffer=6)
    first, second = _texts(one, 0, 5), _texts(one, 5, 5)
    in_order = _texts(RowStream(pattern, {}, 0, 1, batch_size=4), 0, 5)
    assert sorted(first) == sorted(second) == sorted(in_order)  # each pass: every row once
    assert len({tuple(first), tuple(second), tuple(in_order)}) == 3  # reshuffled each pass
    assert first != _texts(RowStream(pattern, {}, 0, 1, batch_size=4, seed=2, shuffle_buffer=6), 0, 5)
    assert _texts(one, 3, 4) == (first + second)[12:28]  # resumed after step 3
    ranks = [RowStream(pattern, {}, rank, 2, batch_size=4, seed=1, shuffle_buffer=6) for rank in range(2)]
    for step in range(10):  # the ranks' rows of a step are the one process's rows of that step
        mine = [_texts(rank, step, 1) for rank in ranks]
        assert sorted(mine[0] + mine[1]) == sorted((first + second)[step * 4:(step + 1) * 4])


def test_shuffle_buffer_needs_streaming(tmp_path: Path) -> None:
    for data in ({"train": "a.jsonl", "shuffle_buffer": 8}, {"train": "a.jsonl", "streaming": True,
                                                             "shuffle_buffer": -1}):
        with pytest.raises(ConfigError) as caught:
            from_dict({"task": "causal_lm", "data": data, "training": {"max_steps": 4}})
        message = str(caught.value)
        assert message.startswith(f"data.shuffle_buffer: {data['shuffle_buffer']} must be 0 or more")
    data = {"train": "a.jsonl", "streaming": True, "shuffle_buffer": 8}
    cfg = from_dict({"task": "causal_lm", "data": data, "training": {"max_steps": 4, "seed": 5}})
    stream = RowStream.of_job(cfg, 1, 2)
    assert (stream.shuffle_buffer, stream.seed, stream.rank, stream.world_size) == (8, 5, 1, 2)
