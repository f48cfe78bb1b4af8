"""Common-structure map of DistilBERT (``DistilBertModel`` and its task heads)."""

from __future__ import annotations

from .base import TASK_HEAD, StructureMap

DISTILBERT = StructureMap(
    family="distilbert",
    model_types=("distilbert",),
    roles={
        "embeddings.word_embeddings": "embeddings",
        "transformer.layer.$.attention": "encoder.block.$.attn",
        "transformer.layer.$.attention.q_lin": "encoder.block.$.attn.q",
        "transformer.layer.$.attention.k_lin": "encoder.block.$.attn.k",
        "transformer.layer.$.attention.v_lin": "encoder.block.$.attn.v",
        "transformer.layer.$.attention.out_lin": "encoder.block.$.attn.proj",
        "transformer.layer.$.sa_layer_norm": "encoder.block.$.attn.layer_norm",
        "transformer.layer.$.ffn": "encoder.block.$.ff",
        "transformer.layer.$.ffn.lin1": "encoder.block.$.ff.w1",
        "transformer.layer.$.ffn.lin2": "encoder.block.$.ff.w2",
        "transformer.layer.$.output_layer_norm": "encoder.block.$.ff.layer_norm",
        "vocab_projector": "lm_head.proj",
        "pre_classifier": TASK_HEAD,
        "classifier": TASK_HEAD,
        "qa_outputs": TASK_HEAD,
    },
)
