"""Common-structure map of GPT-2 (fused ``c_attn`` Conv1D plays q, k and v at once)."""

from __future__ import annotations

from .base import TASK_HEAD, StructureMap

GPT2 = StructureMap(
    family="gpt2",
    model_types=("gpt2",),
    transposed_linear_classes=("Conv1D",),
    roles={
        "wte": "embeddings",
        "h.$.attn": "decoder.block.$.attn",
        "h.$.attn.c_attn": (
            "decoder.block.$.attn.q",
            "decoder.block.$.attn.k",
            "decoder.block.$.attn.v",
        ),
        "h.$.attn.c_proj": "decoder.block.$.attn.proj",
        "h.$.ln_1": "decoder.block.$.attn.layer_norm",
        "h.$.mlp": "decoder.block.$.ff",
        "h.$.mlp.c_fc": "decoder.block.$.ff.w1",
        "h.$.mlp.c_proj": "decoder.block.$.ff.w2",
        "h.$.ln_2": "decoder.block.$.ff.layer_norm",
        "lm_head": "lm_head.proj",
        "score": TASK_HEAD,
        "classifier": TASK_HEAD,
        "qa_outputs": TASK_HEAD,
    },
)
