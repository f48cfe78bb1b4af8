"""Common-structure map of RoBERTa: BERT's module paths, with its own MLM head path."""

from __future__ import annotations

from .base import TASK_HEAD, StructureMap
from .bert import BERT_BODY_ROLES

ROBERTA = StructureMap(
    family="roberta",
    model_types=("roberta",),
    roles={
        **BERT_BODY_ROLES,
        "lm_head.decoder": "lm_head.proj",
        "classifier": TASK_HEAD,
        "qa_outputs": TASK_HEAD,
    },
)
