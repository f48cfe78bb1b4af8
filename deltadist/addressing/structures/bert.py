"""Common-structure map of BERT (``BertModel`` and its task heads)."""

from __future__ import annotations

from .base import TASK_HEAD, StructureMap

BERT_BODY_ROLES: dict[str, str | tuple[str, ...]] = {
    "embeddings.word_embeddings": "embeddings",
    "encoder.layer.$.attention": "encoder.block.$.attn",
    "encoder.layer.$.attention.self.query": "encoder.block.$.attn.q",
    "encoder.layer.$.attention.self.key": "encoder.block.$.attn.k",
    "encoder.layer.$.attention.self.value": "encoder.block.$.attn.v",
    "encoder.layer.$.attention.output.dense": "encoder.block.$.attn.proj",
    "encoder.layer.$.attention.output.LayerNorm": "encoder.block.$.attn.layer_norm",
    "encoder.layer.$.intermediate.dense": "encoder.block.$.ff.w1",
    "encoder.layer.$.output": "encoder.block.$.ff",
    "encoder.layer.$.output.dense": "encoder.block.$.ff.w2",
    "encoder.layer.$.output.LayerNorm": "encoder.block.$.ff.layer_norm",
}
"""Embeddings and encoder layers, shared as-is by RoBERTa (only the MLM head path differs)."""

BERT = StructureMap(
    family="bert",
    model_types=("bert",),
    roles={
        **BERT_BODY_ROLES,
        "cls.predictions.decoder": "lm_head.proj",
        "classifier": TASK_HEAD,
        "qa_outputs": TASK_HEAD,
    },
)
