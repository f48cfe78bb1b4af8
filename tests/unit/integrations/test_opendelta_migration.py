"""What a script written for OpenDelta meets first when run against deltadist under an ``opendelta``
import alias: ``backend=`` accepted, ``opendelta.utils.inspect``'s statistics, the same names."""

from __future__ import annotations

import contextlib
import io
import sys
import textwrap

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import deltadist
import deltadist.utils.inspect
from deltadist import ConfigError, LoraModel
from deltadist.utils.inspect import inspect_module_statistics, inspect_optimizer_statistics


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3))


@pytest.mark.parametrize("backend", ["hf", "bmt"])
def test_opendeltas_backend_switch_is_accepted(backend: str) -> None:
    delta = LoraModel(backbone_model=bert(), modified_modules=["query"], backend=backend)
    assert "backend" not in delta.config.to_dict() and len(delta.sites) == 2


def test_another_backend_is_refused_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match="backend must be one of 'hf', 'bmt'.*got 'jax'"):
        LoraModel(backbone_model=bert(), backend="jax")


def test_module_statistics_count_deltas_trainable_and_total() -> None:
    model = bert()
    total = sum(p.numel() for p in model.parameters())
    delta = LoraModel(backbone_model=model, modified_modules=["query"], lora_r=4)
    delta.freeze_module()
    lora = 2 * (4 * 32 + 32 * 4)  # two query layers, A [4, 32] and B [32, 4]
    head = 3 * 32 + 3  # the classifier copy the delta trains
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        stats = inspect_module_statistics(model)
    assert stats["total_parameters"] == total + lora + head
    assert stats["trainable_parameters"] == stats["delta_parameters"] == lora + head
    assert stats["delta_ratio"] == pytest.approx((lora + head) / (total + lora + head))
    assert stats["cudamem"] == 0.0 and f"delta_parameters: {lora + head:,}" in printed.getvalue()


def test_optimizer_statistics_tell_deltas_and_frozen_parameters_per_group() -> None:
    model = bert()
    delta = LoraModel(backbone_model=model, modified_modules=["query"], lora_r=4)
    delta.freeze_module()
    embeddings = list(model.bert.embeddings.parameters())  # frozen: a mistake the statistics show
    optimizer = torch.optim.AdamW([{"params": list(delta.parameters()), "lr": 1e-3},
                                   {"params": embeddings, "lr": 1e-5, "weight_decay": 0.1}])
    with contextlib.redirect_stdout(io.StringIO()):
        stats = inspect_optimizer_statistics(optimizer, model=model)
    first, second = stats["param_group_0"], stats["param_group_1"]
    assert first["delta_parameters"] == first["trainable_parameters"] == first["total_parameters"] == 611
    assert first["frozen_parameters"] == 0 and first["lr"] == 1e-3
    frozen = sum(p.numel() for p in embeddings)
    assert second["frozen_parameters"] == second["backbone_parameters"] == frozen
    assert second["delta_parameters"] == 0 and second["weight_decay"] == 0.1
    assert "delta_parameters" not in inspect_optimizer_statistics(optimizer, verbose=False)["param_group_0"]


def test_a_script_written_for_opendelta_runs_under_an_import_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, module in {"opendelta": deltadist, "opendelta.utils": deltadist.utils,
                         "opendelta.utils.inspect": deltadist.utils.inspect}.items():
        monkeypatch.setitem(sys.modules, name, module)
    script = textwrap.dedent("""
        from opendelta import AutoDeltaConfig, AutoDeltaModel
        from opendelta.utils.inspect import inspect_optimizer_statistics
        config = AutoDeltaConfig.from_dict({"delta_type": "adapter", "modified_modules": ["output.dense"],
                                            "bottleneck_dim": 8, "backend": "hf"})
        delta = AutoDeltaModel.from_config(config, backbone_model=model)
        delta.freeze_module(exclude=["deltas", "classifier"], set_state_dict=True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        stats = inspect_optimizer_statistics(optimizer)
        delta.save_finetuned(path)
    """)
    namespace = {"model": bert(), "torch": torch, "path": None}
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        namespace["path"] = str(__import__("tempfile").mkdtemp())
        exec(script, namespace)
    assert namespace["stats"]["param_group_0"]["trainable_parameters"] > 0
    assert (__import__("pathlib").Path(namespace["path"]) / "delta.safetensors").is_file()
