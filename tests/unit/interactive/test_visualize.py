"""Visualization, parameter_summary and delta.log() on a tiny BERT with LoRA."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import deltadist
from deltadist.engines import Engine
from deltadist.interactive.visualize import Visualization, parameter_summary

LAYERS, HIDDEN, INTER, VOCAB, R = 4, 32, 37, 99, 4


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                        intermediate_size=INTER, vocab_size=VOCAB)
    return BertForSequenceClassification(config)


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


# Hand-computed logical sizes of the tiny BERT above.
EMBEDDINGS = VOCAB * HIDDEN + 512 * HIDDEN + 2 * HIDDEN + 2 * HIDDEN
LAYER = (4 * _linear(HIDDEN, HIDDEN) + 2 * HIDDEN + _linear(HIDDEN, INTER)
         + _linear(INTER, HIDDEN) + 2 * HIDDEN)
BACKBONE = EMBEDDINGS + LAYERS * LAYER + _linear(HIDDEN, HIDDEN) + _linear(HIDDEN, 2)
DELTA = LAYERS * 2 * (R * HIDDEN + HIDDEN * R)


@pytest.fixture
def lora_bert() -> tuple[nn.Module, deltadist.LoraModel]:
    model = _bert()
    delta = deltadist.LoraModel(backbone_model=model, modified_modules=["query", "value"], lora_r=R,
                                unfrozen_modules=["deltas"])  # no task head: counts are the LoRA's
    delta.freeze_module()
    return model, delta


def _graph(model: nn.Module, **kwargs) -> str:
    return Visualization(model).structure_graph(printTree=False, **kwargs)


def _block_lines(text: str) -> list[str]:
    """The labels of BertLayer nodes, e.g. ``["0-3 (BertLayer) ×4"]``."""
    return [line.split("── ")[-1] for line in text.splitlines() if "(BertLayer)" in line]


def test_repeated_layers_fold_into_one_node(lora_bert) -> None:
    model, _ = lora_bert
    text = _graph(model)
    assert _block_lines(text) == [f"0-{LAYERS - 1} (BertLayer) ×{LAYERS}"]
    assert not re.search(r"── [0-3] \(", text)
    assert text.count("lora (LoRA) [delta]") == 2  # query and value, shown once for all layers
    assert f"lora_A:[{R}, {HIDDEN}]" in text and f"lora_B:[{HIDDEN}, {R}]" in text
    assert f"word_embeddings (Embedding) weight:[{VOCAB}, {HIDDEN}]" in text
    assert text.startswith("root (BertForSequenceClassification)\n")


def test_expand_params_shows_every_layer(lora_bert) -> None:
    model, _ = lora_bert
    lines = _block_lines(_graph(model, expand_params=True, rootname="bert-tiny"))
    assert lines == [f"{i} (BertLayer)" for i in range(LAYERS)]


def test_a_delta_on_one_layer_splits_the_fold() -> None:
    model = _bert()
    only_layer_0 = ["bert.encoder.layer.0.attention.self.query"]
    deltadist.LoraModel(backbone_model=model, modified_modules=only_layer_0, lora_r=R)
    text = _graph(model)
    assert _block_lines(text) == ["0 (BertLayer)", f"1-{LAYERS - 1} (BertLayer) ×{LAYERS - 1}"]
    assert text.count("lora (LoRA) [delta]") == 1


def test_trainable_state_splits_the_fold() -> None:
    model = _bert()
    for p in model.parameters():
        p.requires_grad_(False)
    model.bert.encoder.layer[3].output.dense.bias.requires_grad_(True)
    assert _block_lines(_graph(model)) == ["0-2 (BertLayer) ×3", "3 (BertLayer)"]


def test_modules_without_parameters_are_hidden_unless_kept(lora_bert) -> None:
    model, _ = lora_bert
    hidden = _graph(model)
    assert "Dropout" not in hidden and "GELUActivation" not in hidden and "Tanh" not in hidden
    kept = _graph(model, keep_non_params=True)
    assert "dropout (Dropout)" in kept and "(Tanh)" in kept


def test_parameter_summary_counts(lora_bert) -> None:
    model, delta = lora_bert
    summary = parameter_summary(model, delta.engine)
    assert summary == {"total": BACKBONE + DELTA, "trainable": DELTA, "delta": DELTA,
                       "backbone": BACKBONE, "sites": LAYERS * 2}


def test_parameter_summary_before_freezing() -> None:
    model = _bert()
    deltadist.LoraModel(backbone_model=model, modified_modules=["value"], lora_r=R)
    summary = parameter_summary(model, Engine())
    head = HIDDEN * 2 + 2  # the delta's own copy of the classifier: trainable, not backbone
    assert summary["trainable"] == summary["total"] == BACKBONE + DELTA // 2 + head
    assert summary["backbone"] == BACKBONE and summary["delta"] == DELTA // 2
    assert summary["sites"] == LAYERS


class _ShardedEngine(Engine):
    """Stands in for ZeRO-3: local tensors are empty, the full shape is in ``ds_shape``."""

    def logical_shape(self, param: torch.Tensor) -> torch.Size:
        return getattr(param, "ds_shape", param.shape)


def test_logical_shapes_come_from_the_engine() -> None:
    model = _bert()
    for p in model.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    engine = _ShardedEngine()
    assert parameter_summary(model, engine)["total"] == BACKBONE
    text = Visualization(model, engine=engine).structure_graph(printTree=False)
    assert f"weight:[{VOCAB}, {HIDDEN}]" in text and "[0]" not in text


def test_wrapper_segments_are_not_shown(lora_bert) -> None:
    model, _ = lora_bert
    plain = _graph(model)
    outer = nn.Module()
    outer.add_module("_orig_mod", model)  # torch.compile's wrapper segment
    ddp_like = nn.Module()
    ddp_like.add_module("module", outer)  # a DDP/DeepSpeed root
    wrapped = _graph(ddp_like)
    assert "_orig_mod" not in wrapped and "module (" not in wrapped
    assert wrapped.split("\n", 1)[1] == plain.split("\n", 1)[1]


def test_common_structure_names(lora_bert) -> None:
    model, _ = lora_bert
    text = _graph(model, common_structure=True)
    assert f"query <encoder.block.0-{LAYERS - 1}.attn.q> (Linear)" in text
    only = _graph(model, only_common=True)
    assert "<embeddings>" in only and "classifier <task_head>" in only and "pooler" not in only


def test_structure_graph_prints_when_asked(lora_bert, capsys) -> None:
    model, _ = lora_bert
    text = Visualization(model).structure_graph()
    assert capsys.readouterr().out == text
    _graph(model)
    assert capsys.readouterr().out == ""


def test_log_reports_ratios(lora_bert, capsys) -> None:
    _, delta = lora_bert
    text = delta.log()
    assert capsys.readouterr().out == text
    assert f"0-{LAYERS - 1} (BertLayer)" in text
    assert f"{100 * DELTA / (BACKBONE + DELTA):.4f}% of total" in text
    assert f"{100 * DELTA / BACKBONE:.4f}% of backbone" in text
    assert re.search(rf"Backbone parameters\s+{BACKBONE:,}", text)
    assert re.search(rf"Delta parameters\s+{DELTA:,}", text)
    assert re.search(rf"Delta sites\s+{LAYERS * 2}\b", text)
    assert re.search(r"Model families\s+bert", text)


def test_log_names_the_trained_backbone_modules_and_counts_them() -> None:
    model = _bert()
    delta = deltadist.LoraModel(backbone_model=model, modified_modules=["query", "value"], lora_r=R)
    delta.freeze_module()  # the task head is trained by default
    text = delta.log(visualization=False)
    head = HIDDEN * 2 + 2
    assert re.search(r"Trained backbone modules\s+classifier", text)
    assert re.search(rf"Trainable parameters\s+{DELTA + head:,}", text)
    assert re.search(rf"Delta parameters\s+{DELTA:,}", text)


def test_log_options_leave_parts_out(lora_bert) -> None:
    _, delta = lora_bert
    text = delta.log(delta_ratio=False, trainable_ratio=False, visualization=False)
    assert "(BertLayer)" not in text and "%" not in text
    assert re.search(rf"Delta parameters\s+{DELTA:,}", text)
