"""Common-structure map of Llama, also serving Qwen2 and Mistral (identical module paths)."""

from __future__ import annotations

from .base import TASK_HEAD, StructureMap

LLAMA = StructureMap(
    family="llama",
    model_types=("llama", "qwen2", "mistral"),
    roles={
        "embed_tokens": "embeddings",
        "layers.$.self_attn": "decoder.block.$.attn",
        "layers.$.self_attn.q_proj": "decoder.block.$.attn.q",
        "layers.$.self_attn.k_proj": "decoder.block.$.attn.k",
        "layers.$.self_attn.v_proj": "decoder.block.$.attn.v",
        "layers.$.self_attn.o_proj": "decoder.block.$.attn.proj",
        "layers.$.input_layernorm": "decoder.block.$.attn.layer_norm",
        "layers.$.mlp": "decoder.block.$.ff",
        "layers.$.mlp.gate_proj": "decoder.block.$.ff.w1",
        "layers.$.mlp.up_proj": "decoder.block.$.ff.w3",
        "layers.$.mlp.down_proj": "decoder.block.$.ff.w2",
        "layers.$.post_attention_layernorm": "decoder.block.$.ff.layer_norm",
        "lm_head": "lm_head.proj",
        "score": TASK_HEAD,
        "qa_outputs": TASK_HEAD,
    },
)
