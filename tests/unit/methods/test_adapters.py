"""The adapter family's math and options: Adapter, LowRankAdapter, Compacter, ParallelAdapter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltadist import (
    AdapterModel, AutoDeltaConfig, AutoDeltaModel, CompacterModel, ConfigError, LowRankAdapterModel,
    ParallelAdapterModel, SiteError,
)
from deltadist.methods.bottleneck import LowRankLinear
from deltadist.methods.phm import PHMLinear, PHMRule, PHMWeight, kronecker_is_cheaper
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import TwoLayer, build_tiny, logits_of, tiny_inputs


def _randomise(delta, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in delta.delta_parameters().values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def test_adapter_is_a_residual_bottleneck_after_the_site_with_the_reference_defaults() -> None:
    model = TwoLayer((4, 48, 3))
    delta = AdapterModel(model, modified_modules=["fc1"])
    assert (delta.config.bottleneck_dim, delta.config.non_linearity) == (24, "gelu_new")
    adapter = model.fc1.adapter
    assert adapter.down.weight.shape == (24, 48) and adapter.up.weight.shape == (48, 24)
    assert torch.count_nonzero(adapter.up.weight) == 0 and adapter.down.weight.std() < 0.02
    _randomise(delta)
    x = torch.randn(5, 4)
    h = nn.functional.linear(x, model.fc1.weight, model.fc1.bias)
    update = adapter.up(nn.functional.gelu(adapter.down(h), approximate="tanh"))
    torch.testing.assert_close(model.fc1(x), h + update)


@pytest.mark.parametrize("rank", [1, 3])
def test_low_rank_projection_is_the_matrix_product_of_its_factors_at_every_rank(rank: int) -> None:
    layer = LowRankLinear(6, 5, rank, "glorot-uniform", start_at_zero=False)
    layer.reset_parameters()
    x = torch.randn(2, 6)
    expected = x @ (layer.left @ layer.right) + layer.bias
    torch.testing.assert_close(layer(x), expected)
    assert torch.linalg.matrix_rank(layer.left @ layer.right) == rank  # OpenDelta's was rank 1 only


def test_low_rank_adapter_defaults_and_accepts_the_reference_spelling() -> None:
    model = build_tiny("bert", "cls")
    config = {"delta_type": "lowrankadapter", "reduction_factor": 4}  # OpenDelta's spelling
    delta = AutoDeltaModel.from_config(config, backbone_model=model)
    assert isinstance(delta, LowRankAdapterModel) and delta.config.delta_type == "low_rank_adapter"
    assert delta.config.low_rank_rank == 1 and delta.config.low_rank_w_init == "glorot-uniform"
    assert AutoDeltaConfig.from_dict({"delta_type": "low_rank_adapter"}).reduction_factor == 32
    site = model.bert.encoder.layer[0].attention.output.dense.low_rank_adapter
    assert site.down.left.shape == (32, 1) and site.down.right.shape == (1, 8)


@pytest.mark.parametrize("factorized", [False, True])
def test_phm_layer_is_a_sum_of_kronecker_products_either_way_it_is_computed(factorized: bool) -> None:
    n, in_f, out_f = 4, 8, 12
    rule = PHMRule(n, factorized, "normal", 0.5)
    weight = PHMWeight(n, in_f, out_f, factorized, 2, "glorot-uniform", 0.1)
    rule.reset_parameters(), weight.reset_parameters()
    layers = [PHMLinear(in_f, out_f, rule, weight, own_rule=False, own_weight=False, kronecker_prod=k,
                        bias=False) for k in (True, False, None)]
    full = sum(torch.kron(rule()[i], weight()[i]) for i in range(n))
    x = torch.randn(3, in_f)
    for layer in layers:
        torch.testing.assert_close(layer(x), x @ full, rtol=1e-5, atol=1e-6)


def test_the_cheaper_phm_path_is_picked_by_the_calls_shape() -> None:
    """Training batches build ``W``; a single row of a wide layer (decoding) contracts the factors."""
    assert kronecker_is_cheaper(rows=8 * 128, in_features=4096)
    assert kronecker_is_cheaper(rows=64, in_features=256)
    assert not kronecker_is_cheaper(rows=1, in_features=4096)
    assert AutoDeltaConfig.from_dict({"delta_type": "compacter"}).kronecker_prod is None  # the default


def test_compacter_shares_one_rule_saved_once_and_trains_it_from_every_site(tmp_path) -> None:
    model, inputs = build_tiny("llama", "cls"), tiny_inputs("llama")
    delta = CompacterModel(model, reduction_factor=4, shared_phm_rule=True, shared_W_phm=True,
                           unfrozen_modules=["deltas"])
    keys = list(delta.delta_parameters())
    shared = [k for k in keys if k.startswith("compacter_shared.")]
    assert shared == ["compacter_shared.phm_rule.factors.0", "compacter_shared.down_weight.factors.0",
                      "compacter_shared.down_weight.factors.1", "compacter_shared.up_weight.factors.0",
                      "compacter_shared.up_weight.factors.1"]
    assert not any("phm_rule" in k or "_weight" in k for k in keys if k not in shared)  # once
    delta.freeze_module()
    logits_of(model, inputs).pow(2).mean().backward()
    assert all(delta.delta_parameters()[k].grad is not None for k in shared)
    _randomise(delta)
    tuned = logits_of(model, inputs)
    delta.save_finetuned(tmp_path / "delta")
    fresh = build_tiny("llama", "cls")
    AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=fresh)
    torch.testing.assert_close(logits_of(fresh, inputs), tuned)


def test_compacter_with_a_fixed_rule_saves_it_but_never_trains_it() -> None:
    model = build_tiny("bert", "cls")
    delta = CompacterModel(model, reduction_factor=4, learn_phm=False, unfrozen_modules=["deltas"])
    delta.freeze_module()
    rules = {k: p for k, p in delta.delta_parameters().items() if ".rule." in k}
    assert rules and not any(p.requires_grad for p in rules.values())
    assert all(p.requires_grad for k, p in delta.delta_parameters().items() if k not in rules)


def test_compacter_names_the_width_it_cannot_divide() -> None:
    model = build_tiny("bert", "cls")
    before = snapshot(model)
    with pytest.raises(SiteError, match=r"width 32 and the bottleneck 2 .* hypercomplex_division=4"):
        CompacterModel(model)  # 32 // 16 = 2 is not divisible by 4
    assert_same_snapshot(before, snapshot(model))
    with pytest.raises(ConfigError, match="phm_c_init"):
        CompacterModel(model, phm_c_init="gaussian")


def test_parallel_adapter_applies_its_scale_beside_the_site() -> None:
    model = TwoLayer((4, 8, 3))
    x = torch.randn(5, 4)
    delta = ParallelAdapterModel(model, modified_modules=["fc2"], bottleneck_dim=6, scaled=4.0)
    _randomise(delta)
    adapter = model.fc2.parallel_adapter
    h = torch.relu(model.fc1(x))
    expected = nn.functional.linear(h, model.fc2.weight, model.fc2.bias) + 4.0 * adapter.up(
        nn.functional.gelu(adapter.down(h), approximate="tanh"))
    torch.testing.assert_close(model(x), expected)


def test_a_parallel_span_reads_the_start_input_and_adds_to_the_end_output() -> None:
    model = TwoLayer((4, 8, 3))
    x = torch.randn(5, 4)
    delta = ParallelAdapterModel(model, modified_modules=[["fc1", "fc2"]], bottleneck_dim=6)
    assert delta.sites == ["fc2"] and model.fc2.parallel_adapter.down.in_features == 4
    _randomise(delta)
    adapter = model.fc2.parallel_adapter
    with delta.disabled():
        base = model(x)
    update = adapter.up(nn.functional.gelu(adapter.down(x), approximate="tanh"))
    torch.testing.assert_close(model(x), base + update)


@pytest.mark.parametrize(("family", "expected"), [
    ("bert", ["attention", "intermediate.dense>output.dense"]),
    ("llama", ["self_attn", "mlp.gate_proj>mlp.down_proj"]),
    ("gpt2", ["attn", "mlp.c_fc>mlp.c_proj"]),
])
def test_parallel_adapter_defaults_are_the_attention_block_and_the_feed_forward_span(family, expected):
    model = build_tiny(family, "base")
    delta = ParallelAdapterModel(model, bottleneck_dim=4)
    layer0 = [a for a in delta.record.attachments if ".0." in f".{a.site_name}."]
    described = sorted(
        (a.site_name.split(".0.", 1)[1] if a.start is None else
         f"{_name(model, a.start).split('.0.', 1)[1]}>{a.site_name.split('.0.', 1)[1]}")
        for a in layer0
    )
    assert described == sorted(expected)


def _name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def test_a_span_with_unequal_matches_is_an_error_naming_both_counts() -> None:
    model = build_tiny("bert", "base")
    with pytest.raises(Exception, match=r"selects 2 .* 1"):
        ParallelAdapterModel(model, modified_modules=[["intermediate.dense", "1.output.dense"]])


def test_adapters_reach_blocks_and_norms_by_their_widths() -> None:
    model = build_tiny("bert", "cls")
    delta = AdapterModel(model, modified_modules=["0.attention", "0.output.LayerNorm"], bottleneck_dim=4)
    assert delta.sites == ["bert.encoder.layer.0.attention", "bert.encoder.layer.0.output.LayerNorm"]
    assert model.bert.encoder.layer[0].attention.adapter.down.in_features == 32
    with pytest.raises(SiteError, match="Cannot tell the hidden-state width"):
        AdapterModel(model, modified_modules=["0.attention.self.dropout"])
