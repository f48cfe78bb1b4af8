"""Model shapes the benchmarks share: a Llama-3-70B built on the meta device (no memory, no weights)."""

from __future__ import annotations

import torch
from torch import nn

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The seven linear projections of each Llama block."""


def llama_8b_on_meta() -> nn.Module:
    """Llama-3-8B's shape (32 layers, hidden 4096, grouped-query attention) on ``meta``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def llama_70b_on_meta() -> nn.Module:
    """Llama-3-70B's shape (80 layers, hidden 8192, grouped-query attention) on ``meta``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        return LlamaForCausalLM(config)
