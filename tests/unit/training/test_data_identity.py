"""What ``--resume`` compares to know the training data are the run's: the tokenized examples
(count and SHA-256 of ids, labels and packing), or a stream's files (names and sizes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltadist.errors import ConfigError
from deltadist.training.data_identity import check_same_data, examples_identity, files_identity
from deltadist.training.streaming import RowStream
from deltadist.training.text_data import TokenizedExample
from tests.text_tasks import write_jsonl

EXAMPLES = [TokenizedExample((5, 6, 7), (-100, 6, 7)), TokenizedExample((8, 9), (-100, 9))]


def _refusal(saved: dict, current: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        check_same_data(saved, current, Path("run/checkpoints/step-00000004"))
    message = str(caught.value)
    assert message.startswith("--resume: the training data differ from when run/checkpoints/step-00000004 "
                              "was written (") and message.endswith("in a new output_dir.")
    return message.split("written (", 1)[1].split("), so", 1)[0]


def test_the_examples_identity_changes_with_any_id_label_or_packing() -> None:
    same = examples_identity(list(EXAMPLES))
    assert same == examples_identity(EXAMPLES) and same["examples"] == 2
    check_same_data(same, examples_identity(EXAMPLES), Path("x"))
    check_same_data(None, same, Path("x"))  # a checkpoint from before identities: not checked
    for other in ([EXAMPLES[0], TokenizedExample((8, 10), (-100, 9))],  # a token
                  [EXAMPLES[0], TokenizedExample((8, 9), (8, 9))],  # a label
                  [EXAMPLES[0], TokenizedExample((8, 9), (-100, 9), (1, 1))],  # packed
                  [EXAMPLES[1], EXAMPLES[0]]):  # the order
        found = _refusal(same, examples_identity(other))
        assert found == "as many training examples, but their token ids differ"
    assert _refusal(same, examples_identity(EXAMPLES[:1])) == "2 training examples then, 1 now"


def test_a_streams_files_are_named_when_added_removed_or_resized(tmp_path: Path) -> None:
    for index in range(3):
        write_jsonl(tmp_path / f"part-{index}.jsonl", [{"text": f"row {index}"}])
    stream = RowStream(str(tmp_path / "part-*.jsonl"), {}, 0, 1, batch_size=2)
    saved = files_identity(stream.files())
    assert [name for name, _ in saved["files"]] == ["part-0.jsonl", "part-1.jsonl", "part-2.jsonl"]
    write_jsonl(tmp_path / "part-3.jsonl", [{"text": "new"}])
    assert _refusal(saved, files_identity(stream.files())) == "part-3.jsonl added"
    (tmp_path / "part-3.jsonl").unlink()
    (tmp_path / "part-0.jsonl").unlink()
    write_jsonl(tmp_path / "part-1.jsonl", [{"text": "row 1"}, {"text": "appended"}])
    before, after = saved["files"][1][1], (tmp_path / "part-1.jsonl").stat().st_size
    assert _refusal(saved, files_identity(stream.files())) == (
        f"part-0.jsonl removed; part-1.jsonl {before:,} bytes then, {after:,} now")
