"""Common-structure maps of every supported model family.

To add a family: write one ``StructureMap`` constant (see ``bert.py``) and register it, in its own
file with :func:`register_structure_map` or here in ``STRUCTURE_MAPS``. Nothing else in deltadist
names a family.
"""

from __future__ import annotations

from deltadist.errors import ConfigError

from .bart import BART
from .base import TASK_HEAD, VISION_SEQUENCE, StructureMap
from .bert import BERT
from .distilbert import DISTILBERT
from .gpt2 import GPT2
from .llama import LLAMA
from .moe import MIXTRAL, QWEN_MOE
from .roberta import ROBERTA
from .t5 import T5
from .vit import VIT

STRUCTURE_MAPS: list[StructureMap] = [BERT, ROBERTA, DISTILBERT, T5, GPT2, BART, LLAMA, MIXTRAL, QWEN_MOE,
                                      VIT]
"""Every structure map; each ``config.model_type`` appears in exactly one of them. When a model's
family is guessed from its module names, the first of the best-matching maps wins."""


def structure_map_for(model_type: object) -> StructureMap | None:
    """The registered map serving ``model_type`` (a ``config.model_type``), or ``None``."""
    for smap in STRUCTURE_MAPS:
        if model_type in smap.model_types:
            return smap
    return None


def register_structure_map(structure_map: StructureMap) -> StructureMap:
    """Make ``structure_map`` known: models whose ``config.model_type`` it lists get its roles
    (method defaults such as LoRA's ``attn.q``/``attn.v`` then work on them).

    Raises:
        ConfigError: a registered map already serves one of its ``model_types``.
    """
    taken = {t: m.family for m in STRUCTURE_MAPS if m is not structure_map for t in m.model_types}
    clashes = [f"{t!r} (family {taken[t]!r})" for t in structure_map.model_types if t in taken]
    if clashes:
        raise ConfigError(f"Structure map {structure_map.family!r} serves model types already served: "
                          f"{', '.join(clashes)}. Give each model_type one map.")
    if structure_map not in STRUCTURE_MAPS:
        STRUCTURE_MAPS.append(structure_map)
    return structure_map


__all__ = ["STRUCTURE_MAPS", "StructureMap", "TASK_HEAD", "VISION_SEQUENCE", "register_structure_map",
           "structure_map_for"]
