"""Common-structure maps of every supported model family.

To add a family: write one file here defining one ``StructureMap`` constant (see ``bert.py``),
then import it below and list it in ``STRUCTURE_MAPS``.
"""

from __future__ import annotations

from .bart import BART
from .base import TASK_HEAD, VISION_SEQUENCE, StructureMap
from .bert import BERT
from .distilbert import DISTILBERT
from .gpt2 import GPT2
from .llama import LLAMA
from .roberta import ROBERTA
from .t5 import T5
from .vit import VIT

STRUCTURE_MAPS: tuple[StructureMap, ...] = (BERT, ROBERTA, DISTILBERT, T5, GPT2, BART, LLAMA, VIT)
"""Every structure map; each ``config.model_type`` appears in exactly one of them."""

__all__ = ["STRUCTURE_MAPS", "StructureMap", "TASK_HEAD", "VISION_SEQUENCE"]
