"""``deltadist train`` on bad input: one line on stderr, exit status 2, no traceback; bugs still raise."""

from pathlib import Path
from typing import Iterator

import pytest
from transformers.utils import logging as hf_logging

from deltadist.cli.main import main
from deltadist.errors import AddressingError, BackboneMismatchError, CheckpointError, EngineError, SiteError
from deltadist.training import loop

PREFIX = "deltadist train: error: "


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line ``main`` wrote to stderr (asserting that it is exactly one, with the prefix)."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith(PREFIX), err
    return lines[0]


def test_yaml_syntax_error_names_file_line_and_column(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("training:\n  epochs: 1\n  lr: [0.1\n")
    assert main(["train", "--config", str(path)]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"{PREFIX}{path}:4:1: invalid YAML: ")  # where yaml saw the problem
    assert "expected ',' or ']'" in line and "line 3, column 7" in line  # and where it started
    assert line.endswith("fix the YAML there.")


def test_yaml_syntax_error_in_an_included_file_names_that_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "base.yaml").write_text("model:\n  max_length: 64\n bad_indent: 1\n")
    (tmp_path / "job.yaml").write_text("include: base.yaml\n")
    assert main(["train", "--config", str(tmp_path / "job.yaml")]) == 2
    assert _error_line(capsys).startswith(f"{PREFIX}{tmp_path / 'base.yaml'}:3:2: invalid YAML: ")


def test_yaml_syntax_error_in_a_set_value(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--set", "delta.modified_modules=[quer"]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"{PREFIX}--set 'delta.modified_modules=[quer': the value is not valid YAML")
    assert "expected ',' or ']'" in line and "quote" in line


@pytest.fixture
def no_progress_bars() -> Iterator[None]:
    """transformers' "Loading weights" bars off (they precede the error on stderr), restored after."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if enabled:
        hf_logging.enable_progress_bar()


@pytest.mark.usefixtures("no_progress_bars")
def test_modified_modules_typo_lists_the_closest_names(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Attaches to the real MiniLM backbone (a few seconds): the error comes from inside ``train``."""
    argv = ["train", "--set", "delta.modified_modules=[quer]", "--set", f"output_dir={tmp_path}"]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "'quer': closest module names: encoder.encoder.layer.$.attention.self.query" in line
    assert "Fix the pattern or drop it." in line


def test_unknown_delta_type_suggests_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--set", "delta.delta_type=lorra"]) == 2
    line = _error_line(capsys)
    assert "Unknown delta_type 'lorra' (did you mean 'lora'" in line and "Known delta types:" in line


def test_missing_config_file_names_it_and_the_fix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "missing.yaml"
    assert main(["train", "--config", str(path)]) == 2
    assert _error_line(capsys) == (
        f"{PREFIX}cannot read the config: {path}: No such file or directory; "
        "check the --config path (and any include: in it)."
    )


@pytest.mark.parametrize("error", [
    AddressingError("These patterns match no module:\n  'x': closest: a, b\nFix the pattern."),
    SiteError("Cannot attach lora to 'pooler' (a Tanh):\n  it has no weight.\nPick a Linear."),
    CheckpointError("delta.safetensors is truncated\nsave it again"),
    BackboneMismatchError("fingerprint differs:\n  saved 1234\n  loaded 5678\nload the right backbone"),
    EngineError("engine fsdp2 needs a process group\nstart it with torchrun"),
], ids=lambda error: type(error).__name__)
def test_delta_errors_from_training_fold_to_one_line(
        error: Exception, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def fail(cfg, resume=False):
        raise error

    monkeypatch.setattr(loop, "train", fail)
    assert main(["train"]) == 2
    line = _error_line(capsys)
    first, *rest = [part.strip() for part in str(error).splitlines()]
    assert line.startswith(PREFIX + first) and all(part in line for part in rest)


def test_unreadable_file_during_training_is_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def fail(cfg, resume=False):
        raise PermissionError(13, "Permission denied", "/runs/out/metrics.json")

    monkeypatch.setattr(loop, "train", fail)
    assert main(["train"]) == 2
    assert _error_line(capsys).startswith(f"{PREFIX}/runs/out/metrics.json: Permission denied; check ")


def test_distributed_ranks_tag_their_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--set", "delta.modified_modules=[quer"]) == 2
    assert capsys.readouterr().err.startswith("deltadist train (rank 1): error: --set ")


@pytest.mark.parametrize("bug", [RuntimeError("boom"), KeyError("lora_A"), ValueError("bad shape")])
def test_bugs_still_raise_with_a_traceback(bug: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(cfg, resume=False):
        raise bug

    monkeypatch.setattr(loop, "train", fail)
    with pytest.raises(type(bug)):
        main(["train"])
