"""Shapes without running the model: a 70B-parameter backbone on the meta device gets its deltas."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deltadist import BitFitModel, LoraModel


def test_70b_llama_on_meta_gets_lora_and_bitfit_shapes_without_memory() -> None:
    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) > 70e9
    lora = LoraModel(model, lora_r=16)
    v = model.model.layers[79].self_attn.v_proj  # grouped-query attention: 8192 -> 1024
    assert v.lora.lora_A.shape == (16, 8192) and v.lora.lora_B.shape == (1024, 16)
    assert len(lora.sites) == 160 and all(p.is_meta for p in lora.parameters())
    bitfit = BitFitModel(model)
    assert model.model.layers[0].input_layernorm.bitfit.bias.shape == (8192,)
    assert model.lm_head.bitfit.bias.shape == (128256,)
    assert all(p.is_meta for p in bitfit.parameters())


def test_70b_llama_on_meta_gets_every_adapter_kind_sized_from_attributes() -> None:
    from deltadist import AdapterModel, CompacterModel, LowRankAdapterModel, ParallelAdapterModel

    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    layer = model.model.layers[79]
    adapter = AdapterModel(model, modified_modules=["o_proj", "down_proj"])
    assert len(adapter.sites) == 160 and layer.mlp.down_proj.adapter.down.weight.shape == (24, 8192)
    low_rank = LowRankAdapterModel(model)  # defaults: attn.proj and ff.w2, 8192 // 32 = 256
    assert layer.self_attn.o_proj.low_rank_adapter.down.right.shape == (1, 256)
    compacter = CompacterModel(model, shared_phm_rule=True)
    assert model.compacter_shared.phm_rule.factors[0].shape == (4, 4, 4)
    assert layer.mlp.down_proj.compacter.down.weight.factors[0].shape == (4, 2048, 1)
    parallel = ParallelAdapterModel(model)  # the attention block and the gate_proj -> down_proj span
    assert layer.mlp.down_proj.parallel_adapter.down.weight.shape == (24, 8192)
    for delta in (adapter, low_rank, compacter, parallel):
        assert all(p.is_meta for p in delta.parameters())
