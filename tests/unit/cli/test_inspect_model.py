"""``deltadist inspect MODEL``: the module tree and, with a delta config, its sites and trainable
counts -- from ``config.json`` alone (these checkpoints have no weights file at all)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification

from deltadist import AutoDeltaModel
from deltadist.cli.main import main

CONFIG = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, num_labels=3, architectures=["BertForSequenceClassification"])


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    CONFIG.save_pretrained(tmp_path / "model")  # config.json only: a weight read would fail
    return tmp_path / "model"


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def test_the_tree_and_the_parameter_count_without_weights(checkpoint: Path) -> None:
    status, out, err = _cli(["inspect", str(checkpoint)])
    total = sum(p.numel() for p in BertForSequenceClassification(CONFIG).parameters())
    assert status == 0, err
    assert "query (Linear)" in out and f"BertForSequenceClassification: {total:,} parameters" in out


def test_a_train_configs_delta_section_shows_its_sites_and_counts(checkpoint: Path, tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"task": "sequence_classification", "delta": {
        "delta_type": "lora", "modified_modules": ["query", "value"], "lora_r": 4}}))
    status, out, err = _cli(["inspect", str(checkpoint), "--delta-config", str(config), "--set", "lora_r=8"])
    assert status == 0, err
    torch.manual_seed(0)
    model = BertForSequenceClassification(CONFIG)
    delta = AutoDeltaModel.from_config({"delta_type": "lora", "modified_modules": ["query", "value"],
                                        "lora_r": 8}, backbone_model=model)
    delta.freeze_module()
    trainable, _ = delta.get_nb_trainable_parameters()
    assert f"{trainable:,}" in out
    assert "lora on 4 sites of BertForSequenceClassification" in out and "lora_A:[8, 32]" in out


@pytest.mark.parametrize(("args", "problem"), [
    (["--set", "modified_modules=[nothing_here]"], "match no module"),
    (["--set", "lora_r"], "--set needs KEY=VALUE"),
    (["--delta-config", "missing.yaml"], "missing.yaml"),
])
def test_bad_input_is_one_error_line(checkpoint: Path, args: list[str], problem: str) -> None:
    status, _, err = _cli(["inspect", str(checkpoint), *args])
    assert status == 2 and err.count("\n") == 1 and err.startswith("deltadist inspect: error: ")
    assert problem in err
