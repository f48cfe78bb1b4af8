"""Checkpoints in OpenDelta's format (``config.json`` + a ``torch.save``'d ``pytorch_model.bin`` of
the trainable entries, as OpenDelta's ``save_finetuned`` writes them), built by hand here, convert
to deltadist deltas that compute what OpenDelta's documentation says the delta computes: LoRA adds
``(x A^T B^T) * alpha / r`` to the module's output, an adapter maps its module's output ``h`` to
``h + up(gelu_new(down(h)))``, BitFit trains the module's bias in place. The expected outputs are
computed with plain forward hooks on an untouched copy of the backbone, not with deltadist."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import pickle
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN

import deltadist
from deltadist import AutoDeltaModel, CheckpointError, ConfigError
from deltadist.cli.main import main

IDS = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64)
    return LlamaForCausalLM(config).eval()


def write_opendelta(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """A checkpoint as OpenDelta writes it: config.json (values equal to its defaults left out) and
    the state dict pickled with torch.save."""
    directory.mkdir(parents=True, exist_ok=True)
    stored = {"opendelta_version": "0.3.2", "transformers_version": "4.26.1", "backbone_hash": "0f3c",
              **config}
    (directory / "config.json").write_text(json.dumps(stored, indent=2, sort_keys=True))
    torch.save(tensors, directory / "pytorch_model.bin")
    return directory


def with_hooks(model: nn.Module, hooks: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
               ) -> torch.Tensor:
    """Logits of ``model`` with each named module's output ``y`` for input ``x`` replaced by
    ``hooks[name](x, y)``."""
    handles = [model.get_submodule(name).register_forward_hook(lambda m, args, out, f=f: f(args[0], out))
               for name, f in hooks.items()]
    try:
        with torch.no_grad():
            return model(IDS).logits
    finally:
        for handle in handles:
            handle.remove()


def sites(model: nn.Module, suffix: str) -> list[str]:
    return [name for name, _ in model.named_modules() if name.endswith(suffix)]


def test_lora_with_its_task_head_converts_to_opendeltas_function(tmp_path: Path) -> None:
    backbone, reference = bert(), bert()
    rank, alpha = 4, 8
    generator = torch.Generator().manual_seed(1)
    tensors: dict[str, torch.Tensor] = {}
    hooks = {}
    for name in sites(backbone, ".query") + sites(backbone, ".value"):
        a, b = torch.randn(rank, 32, generator=generator), torch.randn(32, rank, generator=generator)
        tensors[f"{name}.lora.lora_A"], tensors[f"{name}.lora.lora_B"] = a, b
        hooks[name] = lambda x, y, a=a, b=b: y + (x @ a.T @ b.T) * (alpha / rank)
    head = {"classifier.weight": torch.randn(3, 32, generator=generator), "classifier.bias": torch.randn(3)}
    tensors.update(head)
    reference.classifier.load_state_dict({k.split(".")[1]: v for k, v in head.items()})
    source = write_opendelta(tmp_path / "od", {
        "delta_type": "lora", "lora_r": rank, "lora_alpha": alpha, "modified_modules": ["query", "value"],
        "unfrozen_modules": ["deltas", "classifier"], "backbone_class": "BertForSequenceClassification"},
        tensors)

    delta = deltadist.import_opendelta(source, backbone)
    with torch.no_grad():
        converted = backbone(IDS).logits
    torch.testing.assert_close(converted, with_hooks(reference, hooks), rtol=1e-5, atol=1e-6)

    # Saved in deltadist's format, it loads onto a fresh backbone with from_finetuned.
    delta.save_finetuned(tmp_path / "converted")
    assert set(load_file(tmp_path / "converted" / "delta.safetensors")) == set(tensors)
    fresh = bert()
    AutoDeltaModel.from_finetuned(tmp_path / "converted", backbone_model=fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, converted, rtol=0, atol=0)


def test_an_adapter_with_opendeltas_defaults_converts(tmp_path: Path) -> None:
    """config.json without bottleneck_dim / non_linearity / unfrozen_modules: OpenDelta's defaults
    (24, gelu_new, only the deltas) hold."""
    backbone, reference = bert(), bert()
    generator = torch.Generator().manual_seed(2)
    tensors, hooks = {}, {}
    act = ACT2FN["gelu_new"]
    for name in sites(backbone, "output.dense"):
        out = backbone.get_submodule(name).out_features
        down_w, down_b = torch.randn(24, out, generator=generator) / 5, torch.randn(24, generator=generator)
        up_w, up_b = torch.randn(out, 24, generator=generator) / 5, torch.randn(out, generator=generator)
        prefix = f"{name}.adapter.modulelist"
        tensors.update({f"{prefix}.down_proj.weight": down_w, f"{prefix}.down_proj.bias": down_b,
                        f"{prefix}.up_proj.weight": up_w, f"{prefix}.up_proj.bias": up_b})
        hooks[name] = lambda x, h, dw=down_w, db=down_b, uw=up_w, ub=up_b: h + act(h @ dw.T + db) @ uw.T + ub
    source = write_opendelta(tmp_path / "od", {"delta_type": "adapter", "modified_modules": ["output.dense"],
                                               "sequential": True, "backend": "hf"}, tensors)
    deltadist.import_opendelta(source, backbone)
    with torch.no_grad():
        converted = backbone(IDS).logits
    torch.testing.assert_close(converted, with_hooks(reference, hooks), rtol=1e-5, atol=1e-5)


def test_bitfit_biases_trained_in_place_and_added_convert(tmp_path: Path) -> None:
    """Llama's projections have no bias (OpenDelta registered one: ``<module>.bias``); its norms are
    neither linear nor LayerNorm (OpenDelta added a ``bitfit`` layer: ``<module>.bitfit.bias``);
    BERT's query has a bias, trained in place: deltadist keeps the difference as its offset."""
    generator = torch.Generator().manual_seed(3)
    backbone, reference = llama(), llama()
    tensors, hooks = {}, {}
    for name in sites(backbone, "q_proj"):
        tensors[f"{name}.bias"] = bias = torch.randn(32, generator=generator)
        hooks[name] = lambda x, y, bias=bias: y + bias
    for name in sites(backbone, "post_attention_layernorm"):
        tensors[f"{name}.bitfit.bias"] = bias = torch.randn(32, generator=generator)
        hooks[name] = lambda x, y, bias=bias: y + bias
    source = write_opendelta(tmp_path / "llama", {
        "delta_type": "bitfit", "modified_modules": ["q_proj", "post_attention_layernorm"]}, tensors)
    deltadist.import_opendelta(source, backbone)
    with torch.no_grad():
        torch.testing.assert_close(backbone(IDS).logits, with_hooks(reference, hooks), rtol=1e-5, atol=1e-5)

    backbone, reference = bert(), bert()
    trained = {f"{name}.bias": backbone.get_submodule(name).bias.detach()
               + torch.randn(32, generator=generator) for name in sites(backbone, ".query")}
    config = {"delta_type": "bitfit", "modified_modules": ["query"]}
    source = write_opendelta(tmp_path / "bert", config, trained)
    deltadist.import_opendelta(source, backbone)
    with torch.no_grad():
        for key, value in trained.items():
            reference.get_parameter(key).copy_(value)
        torch.testing.assert_close(backbone(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)
        backbone_biases = {key: backbone.get_parameter(key) for key in trained}
    assert all(not torch.equal(backbone_biases[k], v) for k, v in trained.items())  # never written to


def test_a_key_that_does_not_fit_is_listed_and_the_backbone_is_left_as_it_was(tmp_path: Path) -> None:
    backbone = bert()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    names = sites(backbone, ".query")
    tensors = {f"{n}.lora.lora_A": torch.zeros(8, 32) for n in names}
    tensors.update({f"{n}.lora.lora_B": torch.zeros(32, 8) for n in names[:-1]})
    tensors["bert.pooler.dense.lora.lora_A"] = torch.zeros(8, 32)
    source = write_opendelta(tmp_path / "od", {"delta_type": "lora", "modified_modules": ["query"]}, tensors)
    with pytest.raises(CheckpointError, match=r"(?s)missing.*layer\.1\.attention\.self\.query\.lora\.lora_B"
                                              r".*unexpected.*pooler\.dense\.lora\.lora_A"):
        deltadist.import_opendelta(source, backbone)
    assert list(backbone.state_dict()) == list(before)
    assert not any(isinstance(m, deltadist.DeltaModule) for m in backbone.modules())
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), key


class _Payload:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("code ran",))


def test_reading_runs_no_code_and_unconvertible_methods_say_why(tmp_path: Path) -> None:
    source = write_opendelta(tmp_path / "od", {"delta_type": "lora"}, {})
    (source / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Payload()}))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(CheckpointError, match="without running code"):
        deltadist.import_opendelta(source, bert())
    assert printed.getvalue() == ""
    write_opendelta(source, {"delta_type": "low_rank_adapter"}, {})
    with pytest.raises(ConfigError, match="low_rank_adapter does not convert.*elementwise"):
        deltadist.import_opendelta(source, bert())


def test_from_finetuned_on_an_opendelta_directory_names_the_import_command(tmp_path: Path) -> None:
    source = write_opendelta(tmp_path / "od", {"delta_type": "lora"}, {})
    with pytest.raises(CheckpointError, match="OpenDelta wrote.*deltadist import --from opendelta"):
        AutoDeltaModel.from_finetuned(source, backbone_model=bert())


def test_the_import_command_converts_a_checkpoint_for_a_backbone_on_disk(tmp_path: Path) -> None:
    backbone = bert()
    backbone.save_pretrained(tmp_path / "model")
    names = sites(backbone, ".query")
    generator = torch.Generator().manual_seed(4)
    tensors = {f"{n}.lora.lora_{p}": torch.randn(*shape, generator=generator)
               for n in names for p, shape in (("A", (8, 32)), ("B", (32, 8)))}
    source = write_opendelta(tmp_path / "od", {"delta_type": "lora", "modified_modules": ["query"]}, tensors)
    out = tmp_path / "converted"
    model = str(tmp_path / "model")
    assert main(["import", "--from", "opendelta", str(source), str(out), "--model", model]) == 0
    expected = copy.deepcopy(backbone)
    deltadist.import_opendelta(source, expected)
    loaded = BertForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    AutoDeltaModel.from_finetuned(out, backbone_model=loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected(IDS).logits, rtol=0, atol=0)
