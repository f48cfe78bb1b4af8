"""PEFT's LoRA format both ways, checked against peft itself: logits, task heads, name mapping,
refusals that write (or change) nothing, and the fingerprint rule.

Fingerprint rule: an adapter deltadist exports carries deltadist's backbone fingerprint in its
safetensors header, so loading it back onto another backbone is refused as for deltadist's own
checkpoints (``check_hash=False`` loads anyway); an adapter PEFT wrote has none, so only its tensor
names and shapes are checked against the backbone.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from deltadist import (
    AdapterModel,
    AutoDeltaModel,
    BackboneMismatchError,
    BitFitModel,
    CheckpointError,
    ConfigError,
    LoraModel,
)
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import build_tiny, logits_of, tiny_inputs

peft = pytest.importorskip("peft")
ATOL = 1e-5


def _randomise(params) -> None:
    with torch.no_grad():
        for param in params:
            param.normal_(0, 0.1)


def _peft_logits(family: str, head: str, path) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(build_tiny(family, head), str(path)).eval()
    with torch.no_grad():
        return logits_of(model, tiny_inputs(family))


def _peft_lora_sites(model) -> list[str]:
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


def _peft_adapter(family: str, head: str, path, **config) -> torch.Tensor:
    """Save a PEFT LoRA with random weights (and random trainable heads); return its logits."""
    config.setdefault("target_modules", ["q_proj", "v_proj"] if family == "llama" else ["query", "value"])
    model = peft.get_peft_model(build_tiny(family, head), peft.LoraConfig(
        r=4, lora_alpha=12, init_lora_weights=False, **config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" not in name:
                param.normal_(0, 0.5)  # a trained head
        logits = logits_of(model, tiny_inputs(family))
    model.save_pretrained(str(path))
    return logits


@pytest.mark.parametrize(("family", "head"), [("bert", "cls"), ("llama", "lm"), ("llama", "cls")])
def test_deltadist_to_peft_gives_the_same_logits(tmp_path, family, head) -> None:
    model = build_tiny(family, head)
    delta = LoraModel(model, lora_r=4, lora_alpha=12, lora_dropout=0.1)
    _randomise(delta.parameters())  # the LoRA and the task head (kept by default)
    with torch.no_grad():
        tuned = logits_of(model, tiny_inputs(family))
    delta.save_finetuned(tmp_path, format="peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert [config[k] for k in ("peft_type", "r", "lora_alpha", "lora_dropout")] == ["LORA", 4, 12, 0.1]
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False
    head_name = {"cls": "classifier" if family == "bert" else "score", "lm": None}[head]
    assert config["modules_to_save"] == ([head_name] if head_name else None)
    assert config["task_type"] == {"cls": "SEQ_CLS", "lm": "CAUSAL_LM"}[head]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    site = delta.sites[0]
    assert {f"base_model.model.{site}.lora_A.weight", f"base_model.model.{site}.lora_B.weight"} <= keys
    assert all(k.startswith("base_model.model.") for k in keys)
    torch.testing.assert_close(_peft_logits(family, head, tmp_path), tuned, rtol=0, atol=ATOL)


@pytest.mark.parametrize(("family", "head", "extra"), [
    ("bert", "cls", {"task_type": "SEQ_CLS"}),  # PEFT trains and saves the classifier
    ("llama", "lm", {"use_rslora": True}),      # scale alpha / sqrt(r): deltadist's use_rslora
    ("llama", "cls", {"modules_to_save": ["score"], "lora_dropout": 0.05}),
])
def test_peft_to_deltadist_gives_the_same_logits(tmp_path, family, head, extra) -> None:
    expected = _peft_adapter(family, head, tmp_path, **extra)
    model = build_tiny(family, head)
    base = logits_of(model, tiny_inputs(family))
    delta = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model)
    assert isinstance(delta, LoraModel)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, tiny_inputs(family)), expected, rtol=0, atol=ATOL)
    targets = ["q_proj", "v_proj"] if family == "llama" else ["query", "value"]
    assert delta.config.modified_modules == targets
    assert delta.config.unfrozen_modules == ["deltas"] + (["classifier"] if family == "bert" else
                                                          ["score"] if head == "cls" else [])
    delta.detach()  # the base model again (a loaded task head keeps its values: it is the backbone's)
    if head == "lm":
        assert torch.equal(logits_of(model, tiny_inputs(family)), base)


def test_a_trained_task_head_goes_both_ways(tmp_path) -> None:
    model = build_tiny("distilbert", "cls")  # a two-module head: pre_classifier and classifier
    delta = LoraModel(model, lora_r=2)
    assert delta.record.kept_backbone
    _randomise(delta.parameters())
    tuned = logits_of(model, tiny_inputs("distilbert"))
    delta.save_finetuned(tmp_path / "out", format="peft")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["pre_classifier", "classifier"]
    torch.testing.assert_close(_peft_logits("distilbert", "cls", tmp_path / "out"), tuned, rtol=0, atol=ATOL)
    fresh = build_tiny("distilbert", "cls")
    untouched = fresh.classifier.weight.detach().clone()
    again = AutoDeltaModel.from_finetuned(tmp_path / "out", backbone_model=fresh)
    assert set(again.record.kept_backbone) == set(delta.record.kept_backbone)
    torch.testing.assert_close(logits_of(fresh, tiny_inputs("distilbert")), tuned, rtol=0, atol=ATOL)
    # modules_to_save land on the delta's own copies; the backbone's head stays as it was
    assert again.unfrozen_backbone_parameters()["classifier.weight"] is fresh.classifier.copy.module.weight
    assert torch.equal(fresh.classifier.weight, untouched)


def test_without_a_task_head_no_task_type_asks_peft_for_one(tmp_path) -> None:
    # PEFT's SEQ_CLS wraps "classifier" itself and then needs its tensors in the file.
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, lora_r=2, unfrozen_modules=["deltas"])
    _randomise(delta.parameters())
    tuned = logits_of(model, tiny_inputs("bert"))
    delta.save_finetuned(tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] is None and config["modules_to_save"] is None
    torch.testing.assert_close(_peft_logits("bert", "cls", tmp_path), tuned, rtol=0, atol=ATOL)


def test_conv1d_sites_go_both_ways(tmp_path) -> None:
    model = build_tiny("gpt2", "lm")
    delta = LoraModel(model, lora_r=2, modified_modules=["c_attn"])
    _randomise(delta.parameters())
    tuned = logits_of(model, tiny_inputs("gpt2"))
    delta.save_finetuned(tmp_path, format="peft")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    torch.testing.assert_close(_peft_logits("gpt2", "lm", tmp_path), tuned, rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", [BitFitModel, AdapterModel])
def test_another_method_is_refused_and_nothing_is_written(tmp_path, method) -> None:
    delta = method(build_tiny("bert", "cls"))
    with pytest.raises(ConfigError, match=rf"only a LoRA delta; this is a '{delta.delta_type}' delta"):
        delta.save_finetuned(tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()


def test_a_lora_site_peft_cannot_wrap_is_named_and_nothing_is_written(tmp_path) -> None:
    class Projection(nn.Module):  # linear to deltadist (one 2-D weight), not to PEFT
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, self.weight)

    model = nn.Sequential(nn.Linear(4, 4), Projection())
    delta = LoraModel(model, modified_modules=["0", "1"], lora_r=2)
    with pytest.raises(ConfigError, match=r"cannot express LoRA on these sites:\n  1 \(Projection;"):
        delta.save_finetuned(tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()


def test_target_module_names_map_both_ways(tmp_path) -> None:
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, modified_modules=[r"[r]0\.attention\.self\.query", "value"], lora_r=2,
                      delta_name="layer0")
    _randomise(delta.parameters())
    delta.save_finetuned(tmp_path / "a", format="peft")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["0.attention.self.query", "value"]  # shortest exact suffixes
    loaded = peft.PeftModel.from_pretrained(build_tiny("bert", "cls"), str(tmp_path / "a"))
    assert _peft_lora_sites(loaded) == sorted(delta.sites)
    back = AutoDeltaModel.from_finetuned(tmp_path / "a", backbone_model=build_tiny("bert", "cls"))
    assert back.config.modified_modules == delta.config.modified_modules  # deltadist's patterns kept
    assert back.name == "layer0" and back.sites == delta.sites

    # PEFT's regex (full match) and layers_to_transform, which deltadist's patterns do not copy.
    _peft_adapter("bert", "cls", tmp_path / "b", target_modules=r".*\.1\.attention\.self\.(query|key)")
    regex = AutoDeltaModel.from_finetuned(tmp_path / "b", backbone_model=build_tiny("bert", "cls"))
    assert regex.config.modified_modules == [r"[r].*\.1\.attention\.self\.(query|key)"]
    _peft_adapter("llama", "lm", tmp_path / "c", target_modules=["q_proj", "down_proj"],
                  layers_to_transform=[1])
    layer = AutoDeltaModel.from_finetuned(tmp_path / "c", backbone_model=build_tiny("llama", "lm"))
    assert layer.config.modified_modules == ["model.layers.1.self_attn.q_proj",
                                             "model.layers.1.mlp.down_proj"]


def test_peft_biases_become_kept_backbone_parameters(tmp_path) -> None:
    expected = _peft_adapter("bert", "cls", tmp_path, bias="lora_only")  # keys <site>.base_layer.bias
    model = build_tiny("bert", "cls")
    delta = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model)
    assert "bert.encoder.layer.0.attention.self.query.bias" in delta.record.kept_backbone
    torch.testing.assert_close(logits_of(model, tiny_inputs("bert")), expected, rtol=0, atol=ATOL)
    delta.save_finetuned(tmp_path / "again", format="peft")  # and back, under base_layer again
    torch.testing.assert_close(_peft_logits("bert", "cls", tmp_path / "again"), expected, rtol=0, atol=ATOL)


def test_fingerprint_rule(tmp_path) -> None:
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, lora_r=2, unfrozen_modules=["deltas"])
    _randomise(delta.parameters())
    delta.save_finetuned(tmp_path / "ours", format="peft")
    other = build_tiny("bert", "cls", seed=3)
    before = snapshot(other)
    with pytest.raises(BackboneMismatchError, match="check_hash=False"):
        AutoDeltaModel.from_finetuned(tmp_path / "ours", backbone_model=other)
    assert_same_snapshot(before, snapshot(other))
    AutoDeltaModel.from_finetuned(tmp_path / "ours", backbone_model=other, check_hash=False)
    # PEFT's own adapters carry no fingerprint: any backbone the tensors fit is accepted.
    _peft_adapter("bert", "cls", tmp_path / "theirs")
    AutoDeltaModel.from_finetuned(tmp_path / "theirs", backbone_model=build_tiny("bert", "cls", seed=3))


def test_a_changed_export_is_refused_by_its_checksum(tmp_path) -> None:
    delta = LoraModel(build_tiny("bert", "cls"), lora_r=2)
    delta.save_finetuned(tmp_path, format="peft")
    weights = str(tmp_path / "adapter_model.safetensors")
    with safe_open(weights, "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    next(iter(tensors.values())).add_(1)
    save_file(tensors, weights, metadata=metadata)
    with pytest.raises(CheckpointError, match="modified or corrupted"):
        AutoDeltaModel.from_finetuned(tmp_path, backbone_model=build_tiny("bert", "cls"))


def test_a_pickle_only_adapter_is_refused_without_reading_it(tmp_path) -> None:
    _peft_adapter("bert", "cls", tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    model = build_tiny("bert", "cls")
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="adapter_model.bin, a pickle"):
        AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model)
    assert_same_snapshot(before, snapshot(model))


def test_peft_features_deltadist_cannot_express_are_refused(tmp_path) -> None:
    _peft_adapter("bert", "cls", tmp_path, lora_bias=True)
    model = build_tiny("bert", "cls")
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"cannot express: a bias on lora_B \(lora_bias\)"):
        AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model)
    assert_same_snapshot(before, snapshot(model))
    with pytest.raises(ConfigError, match="PEFT LoRA adapter, not a 'bitfit' delta"):
        BitFitModel.from_finetuned(tmp_path, backbone_model=model)


def test_load_finetuned_resumes_from_a_peft_adapter(tmp_path) -> None:
    expected = _peft_adapter("llama", "lm", tmp_path)
    model = build_tiny("llama", "lm")
    delta = LoraModel(model, modified_modules=["q_proj", "v_proj"], lora_r=4, lora_alpha=12)
    delta.load_finetuned(tmp_path)
    torch.testing.assert_close(logits_of(model, tiny_inputs("llama")), expected, rtol=0, atol=ATOL)


def test_an_edited_adapter_config_is_used_with_a_warning(tmp_path) -> None:
    delta = LoraModel(build_tiny("bert", "cls"), lora_r=2)
    delta.save_finetuned(tmp_path, format="peft")
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "lora_alpha": 4}))
    with pytest.warns(UserWarning, match="differs from the config saved with.*lora_alpha"):
        again = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=build_tiny("bert", "cls"))
    assert again.config.lora_alpha == 4


def test_a_save_leaves_exactly_one_checkpoint_in_its_directory(tmp_path) -> None:
    """PEFT format over an earlier deltadist checkpoint (and back): the loader cannot pick a stale
    one, because the other format's files are gone, with a warning naming them."""
    model = build_tiny("llama", "lm")
    delta = LoraModel(model, lora_r=2, unfrozen_modules=["deltas"])
    delta.save_finetuned(tmp_path)
    with torch.no_grad():
        for param in delta.parameters():
            param.add_(0.1)
    with pytest.warns(UserWarning, match="removed delta.safetensors, delta_config.json"):
        delta.save_finetuned(tmp_path, format="peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    inputs = tiny_inputs("llama")
    fresh = build_tiny("llama", "lm")
    AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh)
    torch.testing.assert_close(logits_of(fresh, inputs), logits_of(model, inputs))
    with pytest.warns(UserWarning, match="removed adapter_config.json, adapter_model.safetensors"):
        delta.save_finetuned(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta.safetensors", "delta_config.json"]
