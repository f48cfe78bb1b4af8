"""Common-structure map of T5, v1.0 (``DenseReluDense.wi``) and v1.1 gated (``wi_0``/``wi_1``)."""

from __future__ import annotations

from .base import TASK_HEAD, StructureMap

T5 = StructureMap(
    family="t5",
    model_types=("t5",),
    head_size_attrs=("d_kv",),
    hidden_size_attrs=("d_model",),
    roles={
        # transformers 5 keeps `shared` as a separate module that forward never calls.
        "encoder.embed_tokens": "embeddings",
        "encoder.block.$.layer.0": "encoder.block.$.attn",
        "encoder.block.$.layer.0.SelfAttention.q": "encoder.block.$.attn.q",
        "encoder.block.$.layer.0.SelfAttention.k": "encoder.block.$.attn.k",
        "encoder.block.$.layer.0.SelfAttention.v": "encoder.block.$.attn.v",
        "encoder.block.$.layer.0.SelfAttention.o": "encoder.block.$.attn.proj",
        "encoder.block.$.layer.0.layer_norm": "encoder.block.$.attn.layer_norm",
        "encoder.block.$.layer.1": "encoder.block.$.ff",
        "encoder.block.$.layer.1.DenseReluDense.wi": "encoder.block.$.ff.w1",
        "encoder.block.$.layer.1.DenseReluDense.wi_0": "encoder.block.$.ff.w1",
        "encoder.block.$.layer.1.DenseReluDense.wi_1": "encoder.block.$.ff.w3",
        "encoder.block.$.layer.1.DenseReluDense.wo": "encoder.block.$.ff.w2",
        "encoder.block.$.layer.1.layer_norm": "encoder.block.$.ff.layer_norm",
        "decoder.block.$.layer.0": "decoder.block.$.attn",
        "decoder.block.$.layer.0.SelfAttention.q": "decoder.block.$.attn.q",
        "decoder.block.$.layer.0.SelfAttention.k": "decoder.block.$.attn.k",
        "decoder.block.$.layer.0.SelfAttention.v": "decoder.block.$.attn.v",
        "decoder.block.$.layer.0.SelfAttention.o": "decoder.block.$.attn.proj",
        "decoder.block.$.layer.0.layer_norm": "decoder.block.$.attn.layer_norm",
        "decoder.block.$.layer.1": "decoder.block.$.crossattn",
        "decoder.block.$.layer.1.EncDecAttention.q": "decoder.block.$.crossattn.q",
        "decoder.block.$.layer.1.EncDecAttention.k": "decoder.block.$.crossattn.k",
        "decoder.block.$.layer.1.EncDecAttention.v": "decoder.block.$.crossattn.v",
        "decoder.block.$.layer.1.EncDecAttention.o": "decoder.block.$.crossattn.proj",
        "decoder.block.$.layer.1.layer_norm": "decoder.block.$.crossattn.layer_norm",
        "decoder.block.$.layer.2": "decoder.block.$.ff",
        "decoder.block.$.layer.2.DenseReluDense.wi": "decoder.block.$.ff.w1",
        "decoder.block.$.layer.2.DenseReluDense.wi_0": "decoder.block.$.ff.w1",
        "decoder.block.$.layer.2.DenseReluDense.wi_1": "decoder.block.$.ff.w3",
        "decoder.block.$.layer.2.DenseReluDense.wo": "decoder.block.$.ff.w2",
        "decoder.block.$.layer.2.layer_norm": "decoder.block.$.ff.layer_norm",
        "lm_head": "lm_head.proj",
        "classification_head": TASK_HEAD,
        "qa_outputs": TASK_HEAD,
    },
)
