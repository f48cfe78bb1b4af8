"""Common-structure map of ViT: transformers 5 module paths (``layers.$.attention.q_proj``) and 4.5x ones."""

from __future__ import annotations

from .base import TASK_HEAD, VISION_SEQUENCE, StructureMap

VIT = StructureMap(
    family="vit",
    model_types=("vit",),
    roles={
        "embeddings.patch_embeddings": "embeddings",
        "embeddings": VISION_SEQUENCE,  # [class token, patches]: where prompts go
        "layers.$.attention": "encoder.block.$.attn",
        "layers.$.attention.q_proj": "encoder.block.$.attn.q",
        "layers.$.attention.k_proj": "encoder.block.$.attn.k",
        "layers.$.attention.v_proj": "encoder.block.$.attn.v",
        "layers.$.attention.o_proj": "encoder.block.$.attn.proj",
        "layers.$.layernorm_before": "encoder.block.$.attn.layer_norm",
        "layers.$.mlp": "encoder.block.$.ff",
        "layers.$.mlp.fc1": "encoder.block.$.ff.w1",
        "layers.$.mlp.fc2": "encoder.block.$.ff.w2",
        "layers.$.layernorm_after": "encoder.block.$.ff.layer_norm",
        "classifier": TASK_HEAD,
    },
    legacy_roles={
        "encoder.layer.$.attention": "encoder.block.$.attn",
        "encoder.layer.$.attention.attention.query": "encoder.block.$.attn.q",
        "encoder.layer.$.attention.attention.key": "encoder.block.$.attn.k",
        "encoder.layer.$.attention.attention.value": "encoder.block.$.attn.v",
        "encoder.layer.$.attention.output.dense": "encoder.block.$.attn.proj",
        "encoder.layer.$.layernorm_before": "encoder.block.$.attn.layer_norm",
        "encoder.layer.$.intermediate.dense": "encoder.block.$.ff.w1",
        "encoder.layer.$.output.dense": "encoder.block.$.ff.w2",
        "encoder.layer.$.layernorm_after": "encoder.block.$.ff.layer_norm",
    },
)
