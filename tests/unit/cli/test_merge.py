"""``deltadist merge``: a saved delta folded into its backbone's checkpoint, one site at a time,
written as a plain transformers checkpoint that ``from_pretrained`` loads to the outputs of the
backbone with the delta attached (sharded output, a kept task head, a dtype); deltas without a
merged form, and checkpoints other than the delta's (by its fingerprint), are refused in one line."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from deltadist import AutoDeltaModel
from deltadist.cli.main import main
from deltadist.integrations import merge_checkpoint

IDS = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def _trained(model: torch.nn.Module, config: dict, directory: Path) -> torch.Tensor:
    """Attach ``config``'s delta with random values, save it; the logits it gives."""
    delta = AutoDeltaModel.from_config(config, backbone_model=model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in delta.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        logits = model(IDS).logits
    delta.save_finetuned(directory)
    return logits


def test_a_lora_merges_into_a_sharded_checkpoint_plain_transformers_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "tokenizer_config.json").write_text("{}")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "model").eval()
    expected = _trained(model, {"delta_type": "lora", "modified_modules": ["all-linear"], "lora_r": 4,
                                "use_dora": True}, tmp_path / "delta")

    status, out, err = _cli(["merge", "--model", str(tmp_path / "model"), "--delta", str(tmp_path / "delta"),
                             "--out", str(tmp_path / "merged"), "--max-shard-size", "0"])
    assert status == 0, err
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 10 and "14 sites" in out  # a shard per tensor here
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-4, atol=1e-5)


def test_a_kept_task_head_and_a_dtype(tmp_path: Path) -> None:
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3)).save_pretrained(tmp_path / "model")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    lora = {"delta_type": "lora", "modified_modules": ["query", "value"]}
    expected = _trained(model, lora, tmp_path / "delta")
    status, _, err = _cli(["merge", "--model", str(tmp_path / "model"), "--delta", str(tmp_path / "delta"),
                           "--out", str(tmp_path / "merged"), "--dtype", "bf16"])
    assert status == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)
    assert merged.classifier.weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(IDS).logits.float(), expected, rtol=0.05, atol=0.05)
        full = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        assert not torch.equal(full.classifier.weight, model.classifier.weight)  # the delta's head


def test_a_delta_without_a_merged_form_is_refused_in_one_line(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "model")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "model")
    _trained(model, {"delta_type": "adapter", "modified_modules": ["output.dense"]}, tmp_path / "delta")
    status, _, err = _cli(["merge", "--model", str(tmp_path / "model"), "--delta", str(tmp_path / "delta"),
                           "--out", str(tmp_path / "merged")])
    assert status == 2 and err.count("\n") == 1 and "cannot be merged" in err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("small", [merge_checkpoint.SMALL_TENSOR, 0], ids=["whole", "one-value reads"])
def test_another_checkpoint_is_refused_unless_no_check_hash(small: int, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The fingerprint is read from the checkpoint's files (small tensors whole, others one value
    at a time): the delta's own checkpoint and its bf16 copy merge, another one is named."""
    monkeypatch.setattr(merge_checkpoint, "SMALL_TENSOR", small)
    config = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=False)
    for seed, name in ((0, "model"), (1, "other")):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(tmp_path / name)
    LlamaForCausalLM.from_pretrained(tmp_path / "model").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "model").eval()
    _trained(model, {"delta_type": "lora", "modified_modules": ["q_proj", "v_proj"]}, tmp_path / "delta")

    def merge(source: str, *flags: str) -> tuple[int, str]:
        status, _, err = _cli(["merge", "--model", str(tmp_path / source), "--delta", str(tmp_path / "delta"),
                               "--out", str(tmp_path / f"merged-{source}{len(flags)}"), *flags])
        return status, err

    assert merge("model") == (0, "") and merge("bf16") == (0, "")
    status, err = merge("other")
    assert status == 2 and err.count("\n") == 1 and not (tmp_path / "merged-other0").exists()
    assert err.startswith("deltadist merge: error: This delta was trained on a LlamaForCausalLM: this "
                          "backbone is another checkpoint (")
    assert "model.embed_tokens.weight" in err and "--no-check-hash" in err
    assert merge("other", "--no-check-hash") == (0, "")
