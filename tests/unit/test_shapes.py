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
