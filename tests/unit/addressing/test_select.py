"""Site selection: defaults by role, common_structure, exclude, wrapped and compiled models."""

from __future__ import annotations

import torch
from torch import nn

from deltadist import BitFitModel, LoraModel
from tests.tiny import build_tiny


class Wrapped(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def _sites(delta) -> list[str]:
    return delta.sites


def test_defaults_find_the_model_inside_user_wrappers() -> None:
    t5 = build_tiny("t5", "lm")
    direct = _sites(LoraModel(build_tiny("t5", "lm")))
    wrapped = _sites(LoraModel(Wrapped(Wrapped(t5))))
    assert wrapped == [f"inner.inner.{s}" for s in direct]
    assert any(s.endswith("SelfAttention.q") for s in direct)
    assert any(s.endswith("EncDecAttention.v") for s in direct) is False  # attn.v is self-attention


def test_regex_on_the_wrapped_model_selects_last_decoder_layer() -> None:
    model = Wrapped(Wrapped(build_tiny("t5", "lm")))
    delta = LoraModel(model, modified_modules=["[r]decoder.*1.*DenseReluDense\\.wi"], lora_r=5)
    assert _sites(delta) == ["inner.inner.decoder.block.1.layer.2.DenseReluDense.wi"]


def test_common_structure_names_select_by_role() -> None:
    model = build_tiny("llama", "cls")
    delta = LoraModel(model, modified_modules=["attn.proj", "ff.w2"], common_structure=True)
    assert all(s.endswith(("o_proj", "down_proj")) for s in _sites(delta))
    assert len(_sites(delta)) == 4


def test_exclude_modules_removes_subtrees() -> None:
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, modified_modules=["query", "value"], exclude_modules=["layer.0"])
    assert _sites(delta) and all(".layer.1." in s for s in _sites(delta))


def test_bitfit_broadcasts_into_selected_blocks() -> None:
    model = build_tiny("bert", "cls")
    delta = BitFitModel(model, modified_modules=["0.attention"])
    assert _sites(delta) == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.key",
        "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.0.attention.output.LayerNorm",
    ]


def test_bitfit_default_reaches_lm_head_and_adds_missing_biases() -> None:
    model = build_tiny("llama", "lm")
    delta = BitFitModel(model)
    assert "lm_head" in _sites(delta)
    assert any(s.endswith("input_layernorm") for s in _sites(delta))


def test_patterns_match_the_same_after_torch_compile() -> None:
    model = build_tiny("bert", "cls")
    compiled = torch.compile(model)  # wraps as `_orig_mod`; compiling happens lazily on call
    assert _sites(LoraModel(compiled, modified_modules=["query"])) == [
        f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)
    ]


def test_deltas_on_meta_stay_on_meta_and_take_shapes_without_running() -> None:
    with torch.device("meta"):
        model = build_tiny("llama", "cls")
    delta = LoraModel(model, lora_r=4)
    assert all(p.is_meta for p in delta.parameters())
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora.lora_A.shape == (4, q.in_features) and q.lora.lora_B.shape == (q.out_features, 4)


class CustomLinear(nn.Module):
    """A linear layer without ``in_features`` attributes: its shape comes from meta propagation."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


def test_linear_like_module_without_attributes_gets_shapes_from_meta_propagation() -> None:
    model = nn.Sequential(CustomLinear())
    delta = LoraModel(model, modified_modules=["0"], lora_r=2)
    assert model[0].lora.lora_A.shape == (2, 3) and model[0].lora.lora_B.shape == (6, 2)
    assert delta.num_parameters() == 2 * 3 + 6 * 2
