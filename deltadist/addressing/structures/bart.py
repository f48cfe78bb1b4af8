"""Common-structure map of BART (``BartModel`` and its task heads)."""

from __future__ import annotations

from .base import TASK_HEAD, StructureMap

BART = StructureMap(
    family="bart",
    model_types=("bart",),
    hidden_size_attrs=("d_model",),
    roles={
        # transformers 5 keeps `shared` as a separate module that forward never calls.
        "encoder.embed_tokens": "embeddings",
        "encoder.layers.$.self_attn": "encoder.block.$.attn",
        "encoder.layers.$.self_attn.q_proj": "encoder.block.$.attn.q",
        "encoder.layers.$.self_attn.k_proj": "encoder.block.$.attn.k",
        "encoder.layers.$.self_attn.v_proj": "encoder.block.$.attn.v",
        "encoder.layers.$.self_attn.out_proj": "encoder.block.$.attn.proj",
        "encoder.layers.$.self_attn_layer_norm": "encoder.block.$.attn.layer_norm",
        "encoder.layers.$.fc1": "encoder.block.$.ff.w1",
        "encoder.layers.$.fc2": "encoder.block.$.ff.w2",
        "encoder.layers.$.final_layer_norm": "encoder.block.$.ff.layer_norm",
        "decoder.layers.$.self_attn": "decoder.block.$.attn",
        "decoder.layers.$.self_attn.q_proj": "decoder.block.$.attn.q",
        "decoder.layers.$.self_attn.k_proj": "decoder.block.$.attn.k",
        "decoder.layers.$.self_attn.v_proj": "decoder.block.$.attn.v",
        "decoder.layers.$.self_attn.out_proj": "decoder.block.$.attn.proj",
        "decoder.layers.$.self_attn_layer_norm": "decoder.block.$.attn.layer_norm",
        "decoder.layers.$.encoder_attn": "decoder.block.$.crossattn",
        "decoder.layers.$.encoder_attn.q_proj": "decoder.block.$.crossattn.q",
        "decoder.layers.$.encoder_attn.k_proj": "decoder.block.$.crossattn.k",
        "decoder.layers.$.encoder_attn.v_proj": "decoder.block.$.crossattn.v",
        "decoder.layers.$.encoder_attn.out_proj": "decoder.block.$.crossattn.proj",
        "decoder.layers.$.encoder_attn_layer_norm": "decoder.block.$.crossattn.layer_norm",
        "decoder.layers.$.fc1": "decoder.block.$.ff.w1",
        "decoder.layers.$.fc2": "decoder.block.$.ff.w2",
        "decoder.layers.$.final_layer_norm": "decoder.block.$.ff.layer_norm",
        "lm_head": "lm_head.proj",
        "classification_head": TASK_HEAD,
        "qa_outputs": TASK_HEAD,
    },
)
