"""Tiny, seeded, random-weight models of every supported family, for fast CPU tests.

Everything is built from transformers config classes (``AutoConfig.for_model``); nothing is
downloaded. One table row per family holds its config kwargs and its model classes by head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

VOCAB = 100
PAD, BOS, EOS = 0, 1, 2
"""Special token ids shared by every text family; random tokens are drawn from ``[3, VOCAB)``."""
IMAGE_SIZE, PATCH_SIZE, CHANNELS = 32, 8, 3

_TASK_HEADS = {
    "cls": AutoModelForSequenceClassification, "qa": AutoModelForQuestionAnswering,
    "token": AutoModelForTokenClassification,
}
_ENCODER_HEADS = {**_TASK_HEADS, "lm": AutoModelForMaskedLM}
_DECODER_HEADS = {**_TASK_HEADS, "lm": AutoModelForCausalLM}
_SEQ2SEQ_HEADS = {"cls": AutoModelForSequenceClassification, "qa": AutoModelForQuestionAnswering,
                  "lm": AutoModelForSeq2SeqLM}


@dataclass(frozen=True)
class _Family:
    """One table row: config kwargs, model class per head, and input kind."""

    config: dict[str, Any]
    heads: dict[str, Any]
    encoder_decoder: bool = False
    vision: bool = False


# fmt: off
_TEXT = {"vocab_size": VOCAB, "pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}
_BERT_LIKE = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
}
_LLAMA_LIKE = {
    **_TEXT, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 64, "attention_dropout": 0.0,
    "max_position_embeddings": 64,
}
_FAMILIES: dict[str, _Family] = {
    "bert": _Family({**_TEXT, **_BERT_LIKE, "classifier_dropout": 0.0}, _ENCODER_HEADS),
    "roberta": _Family({**_TEXT, **_BERT_LIKE, "classifier_dropout": 0.0}, _ENCODER_HEADS),
    "distilbert": _Family({
        **_TEXT, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64, "dropout": 0.0,
        "attention_dropout": 0.0, "seq_classif_dropout": 0.0, "qa_dropout": 0.0,
    }, _ENCODER_HEADS),
    "t5": _Family({
        **_TEXT, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
        "num_heads": 4, "dropout_rate": 0.0, "classifier_dropout": 0.0,
        "decoder_start_token_id": PAD,
    }, _SEQ2SEQ_HEADS, encoder_decoder=True),
    "gpt2": _Family({
        **_TEXT, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0,
    }, _DECODER_HEADS),
    "bart": _Family({
        **_TEXT, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
        "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64, "max_position_embeddings": 64, "dropout": 0.0,
        "attention_dropout": 0.0, "activation_dropout": 0.0, "classifier_dropout": 0.0,
        "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "decoder_start_token_id": EOS,
        "forced_eos_token_id": EOS,
    }, _SEQ2SEQ_HEADS, encoder_decoder=True),
    "llama": _Family(_LLAMA_LIKE, _DECODER_HEADS),
    "qwen2": _Family(_LLAMA_LIKE, _DECODER_HEADS),
    "mistral": _Family(_LLAMA_LIKE, _DECODER_HEADS),
    "vit": _Family({
        **_BERT_LIKE, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "num_channels": CHANNELS,
    }, {"cls": AutoModelForImageClassification}, vision=True),
}
_MOE_LIKE = {**_LLAMA_LIKE, "hidden_size": 64, "intermediate_size": 32, "num_experts_per_tok": 2}
_MOE: dict[str, _Family] = {
    "mixtral": _Family({**_MOE_LIKE, "num_local_experts": 4}, _DECODER_HEADS),
    "qwen2_moe": _Family({**_MOE_LIKE, "num_experts": 4, "moe_intermediate_size": 32,
                          "shared_expert_intermediate_size": 32}, _DECODER_HEADS),
    "qwen3_moe": _Family({**_MOE_LIKE, "num_experts": 4, "moe_intermediate_size": 32}, _DECODER_HEADS),
}
# fmt: on

FAMILIES: tuple[str, ...] = tuple(_FAMILIES)
"""Every dense family ``build_tiny`` knows: ``("bert", "roberta", ..., "vit")``."""
MOE_FAMILIES: tuple[str, ...] = tuple(_MOE)
"""The mixture-of-experts families ``build_tiny`` knows too (hidden 64, 4 experts, top 2), kept
out of :data:`FAMILIES`: the tests of every method on every family do not run on them."""
_FAMILIES.update(_MOE)
NUM_LABELS = 3

METHODS: dict[str, dict] = {
    "lora": {"delta_type": "lora", "lora_r": 4},
    "bitfit": {"delta_type": "bitfit"},
    "adapter": {"delta_type": "adapter", "bottleneck_dim": 8},
    # The reference's spelling of the type, so every test through this table also tests the alias.
    "low_rank_adapter": {"delta_type": "lowrankadapter", "reduction_factor": 4, "low_rank_rank": 2},
    # A rule shared by every site: one tensor, held at the model root, sharded and gathered once.
    "compacter": {"delta_type": "compacter", "reduction_factor": 4, "shared_phm_rule": True},
    "parallel_adapter": {"delta_type": "parallel_adapter", "bottleneck_dim": 8, "scaled": 2.0},
    "soft_prompt": {"delta_type": "soft_prompt", "soft_token_num": 3},
    "prefix": {"delta_type": "prefix", "prefix_token_num": 3, "embed_dim": 16, "mid_dim": 16},
}
"""Every method's config, sized for the tiny models (hidden 32), keyed by the method's name."""
PREFIX_NEEDS_TRANSFORMERS_5 = ("bert", "roberta", "distilbert", "t5")
"""Families whose attention routes through ``AttentionInterface`` only from transformers 5."""


def skip_unsupported(family: str, method: str) -> None:
    """Skip a (family, method) case this transformers release cannot run (said in the reason)."""
    import pytest
    import transformers

    old = int(transformers.__version__.split(".")[0]) < 5
    if method == "prefix" and old and family in PREFIX_NEEDS_TRANSFORMERS_5:
        pytest.skip(f"transformers {transformers.__version__}: {family} attention does not route "
                    "through AttentionInterface (PrefixModel refuses it; tested in test_prefix.py)")


PROMPTS = ("soft_prompt", "prefix")
"""Methods that add sequence positions (inputs, or keys and values): not a no-op when fresh."""


def has_head(family: str, head: str) -> bool:
    """Whether ``build_tiny(family, head)`` exists (ViT has only ``"cls"``)."""
    return head == "base" or head in _FAMILIES[family].heads


def build_tiny(
    family: str, head: str = "cls", seed: int = 0, **config_overrides: Any
) -> torch.nn.Module:
    """A tiny random-weight model of ``family`` in eval mode, float32, without dropout.

    Args:
        family: one of :data:`FAMILIES`.
        head: ``"base"`` (bare model), ``"cls"`` (sequence/image classification, 3 labels),
            ``"qa"`` (extractive question answering), ``"token"`` (token classification; not
            T5/BART) or ``"lm"`` (masked LM for encoders, causal LM for decoders, seq2seq LM
            for T5/BART).
        seed: torch seed used for the random weights.
        **config_overrides: extra config kwargs, e.g. ``feed_forward_proj="gated-gelu"``
            for T5 v1.1.

    Raises:
        ValueError: unknown family, or a head transformers has no class for (ViT ``"lm"``).
    """
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES + MOE_FAMILIES}")
    spec = _FAMILIES[family]
    if not has_head(family, head):
        raise ValueError(f"family {family!r} has no {head!r} head")
    config = AutoConfig.for_model(family, **{**spec.config, **config_overrides})
    config.num_labels = 2 if head == "qa" else NUM_LABELS  # start and end logits
    auto_class = AutoModel if head == "base" else spec.heads[head]
    with torch.random.fork_rng(devices=[]):  # seed the weights, leave the caller's RNG alone
        torch.manual_seed(seed)
        model = auto_class.from_config(config, dtype=torch.float32)
    return model.float().eval()


def tiny_inputs(
    family: str, batch: int = 2, seq: int = 8, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Keyword inputs valid for every head of ``build_tiny(family, ...)``.

    Text: ``input_ids`` (random tokens, last one ``EOS`` so T5/BART classification heads find it)
    and an all-ones ``attention_mask``; T5/BART add ``decoder_input_ids`` (``input_ids`` shifted
    right, same length). ViT: ``pixel_values`` of shape ``(batch, 3, 32, 32)``.
    """
    spec = _FAMILIES[family]
    generator = torch.Generator().manual_seed(seed)
    if spec.vision:
        shape = (batch, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
        return {"pixel_values": torch.randn(shape, generator=generator)}
    input_ids = torch.randint(EOS + 1, VOCAB, (batch, seq), generator=generator)
    input_ids[:, -1] = EOS
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if spec.encoder_decoder:
        start = torch.full((batch, 1), spec.config["decoder_start_token_id"])
        inputs["decoder_input_ids"] = torch.cat([start, input_ids[:, :-1]], dim=1)
    return inputs


def logits_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's output ``logits`` (``last_hidden_state`` for base models)."""
    outputs = model(**inputs)
    logits = getattr(outputs, "logits", None)
    return logits if logits is not None else outputs.last_hidden_state


class TwoLayer(torch.nn.Module):
    """``fc2(relu(fc1(x)))``, seeded: the smallest model with two linear sites."""

    def __init__(self, features: tuple[int, int, int] = (4, 8, 3), seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.fc1 = torch.nn.Linear(features[0], features[1])
            self.fc2 = torch.nn.Linear(features[1], features[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [..., in]`` -> ``[..., out]``."""
        return self.fc2(torch.relu(self.fc1(x)))
