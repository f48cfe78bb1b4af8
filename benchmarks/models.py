"""Models the benchmarks share: small seeded Llama and BERT models to train, and Llama-3-8B/70B
shapes on the meta device (no memory, no weights). Imports only torch and transformers, so a peer's
worker in its own environment builds the same models."""

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


def small_llama(hidden: int, layers: int) -> nn.Module:
    """A seeded Llama-shaped causal LM (vocabulary 2000, grouped-query attention, no cache)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2000, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
                         intermediate_size=hidden * 4, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def small_bert(hidden: int, layers: int) -> nn.Module:
    """A seeded 4-class BERT classifier without dropout (every run computes the same)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=2000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        intermediate_size=hidden * 4, num_labels=4, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))


SMALL_MODELS = {"llama": small_llama, "bert": small_bert}
"""The trained families by name."""


def training_batch(family: str, rows: int, tokens: int, vocab: int) -> dict[str, torch.Tensor]:
    """The seeded batch a ``family`` model trains on: ``input_ids [rows, tokens]`` and next-token
    labels (Llama) or 4 class labels ``[rows]`` (BERT)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, tokens), generator=generator)
    labels = ids if family == "llama" else torch.randint(0, 4, (rows,), generator=generator)
    return {"input_ids": ids, "labels": labels}
