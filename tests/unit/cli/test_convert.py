"""``deltadist export`` writes a saved delta as PEFT's adapter that PEFT loads to the same outputs;
``deltadist import --from peft`` reads it back; bad input is one ``error:`` line. (``import --from
opendelta``: tests/unit/integrations/test_opendelta_import.py.)"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from deltadist import AutoDeltaModel, LoraModel
from deltadist.cli.main import main

IDS = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3)).eval()


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def test_export_to_peft_and_import_back_keep_the_outputs(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = bert()
    model.save_pretrained(tmp_path / "model")
    delta = LoraModel(backbone_model=model, modified_modules=["query", "value"], lora_r=4)
    with torch.no_grad():
        for param in delta.parameters():
            param.normal_()
        expected = model(IDS).logits
    delta.save_finetuned(tmp_path / "delta")

    status, out, err = _cli(["export", "--delta", str(tmp_path / "delta"), "--format", "peft",
                             "--out", str(tmp_path / "peft"), "--model", str(tmp_path / "model")])
    assert status == 0, err
    assert "lora delta on 4 sites" in out and (tmp_path / "peft" / "adapter_config.json").is_file()
    base = BertForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        exported = peft.PeftModel.from_pretrained(base, tmp_path / "peft")
        torch.testing.assert_close(exported(IDS).logits, expected)

    status, _, err = _cli(["import", "--from", "peft", str(tmp_path / "peft"), str(tmp_path / "back"),
                           "--model", str(tmp_path / "model")])
    assert status == 0, err
    fresh = BertForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    AutoDeltaModel.from_finetuned(tmp_path / "back", backbone_model=fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, expected)


def test_bad_input_is_one_error_line(tmp_path: Path) -> None:
    status, _, err = _cli(["export", "--delta", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                           "--model", str(tmp_path / "no-model")])
    assert status == 2 and err.count("\n") == 1 and err.startswith("deltadist export: error: ")
    status, _, err = _cli(["import", "--from", "opendelta", str(tmp_path), str(tmp_path / "o"),
                           "--model", str(tmp_path)])
    assert status == 2 and err.startswith("deltadist import: error: ") and err.count("\n") == 1
