"""The data type of a common structure map.

A structure map says, for one model family, which real module paths play which *role* in the
common transformer structure of OpenDelta's docs (``encoder.block.$.attn.q``, ``decoder.block.$.ff.w2``,
``lm_head.proj``...). Method defaults are then written once, by role (``attn.q``), for every family.
It also holds the other facts that differ by family and that the code asks the map for: which
config attributes give the attention shape and the hidden width, which linear classes store their
weight transposed (read through :mod:`deltadist.addressing.facts`).

Maps are data: they name module paths, never import a model class, so they keep working as
transformers renames its classes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping

LAYER_INDEX = "$"
"""Placeholder for a layer index in both real and common templates."""

TASK_HEAD = "task_head"
"""Role of a task head (``classifier``, ``score``, ``qa_outputs``...): new, randomly initialised
modules on top of a pretrained body, trained and saved with the delta by default."""

VISION_SEQUENCE = "embeddings.sequence"
"""Role of a vision model's embeddings module, whose output is the token sequence
``[class token, patches]`` (where soft prompts go, after the class token)."""


@dataclass(frozen=True)
class StructureMap:
    """Real-path templates of one model family mapped to common-structure names.

    Templates are dot paths relative to wherever the family's modules sit in the user's model:
    ``encoder.layer.$.attention.self.query`` matches ``bert.encoder.layer.3.attention.self.query``
    and ``inner.inner.bert.encoder.layer.3...`` alike (suffix match on dot boundaries).
    ``$`` stands for a layer index and is carried over into the common name.
    """

    family: str
    """Short family name, e.g. ``"bert"``."""
    model_types: tuple[str, ...]
    """``config.model_type`` values served by this map (``("bert",)``, ``("llama", "qwen2")``)."""
    roles: Mapping[str, str | tuple[str, ...]] = field(default_factory=dict)
    """Real template -> common name template, or several (a fused ``c_attn`` is q, k and v)."""
    legacy_roles: Mapping[str, str | tuple[str, ...]] = field(default_factory=dict)
    """Like ``roles``, for module paths of older transformers releases (4.5x) that 5.x renamed."""
    transposed_linear_classes: tuple[str, ...] = ()
    """Class names (not classes) of linear layers storing their weight ``[in, out]`` (GPT-2's
    ``Conv1D``), matched on any model: LoRA's merge, shapes and PEFT export transpose them."""
    attention_heads_attrs: tuple[str, ...] = ("num_attention_heads",)
    """Config attributes giving the attention's query head count; the first one set wins (as for
    every ``*_attrs`` fact, read by :func:`deltadist.addressing.facts.config_value`)."""
    kv_heads_attrs: tuple[str, ...] = ("num_key_value_heads",)
    """Config attributes giving the key/value head count (grouped-query); none set: the query heads."""
    head_size_attrs: tuple[str, ...] = ("head_dim",)
    """Config attributes giving the attention head size (T5: ``d_kv``); none set: hidden width / heads."""
    hidden_size_attrs: tuple[str, ...] = ("hidden_size",)
    """Config attributes giving the hidden width (soft prompts' width; T5 and BART: ``d_model``)."""

    @cached_property
    def _compiled(self) -> list[tuple[str, re.Pattern[str], tuple[str, ...]]]:
        """``(last path segment, regex, common names)`` per template; the literal last segment
        lets a name be skipped without running the regex (thousands of modules per lookup)."""
        compiled = []
        for real, common in {**self.roles, **self.legacy_roles}.items():
            commons = (common,) if isinstance(common, str) else tuple(common)
            parts = real.split(".")
            body = r"\.".join(r"(\d+)" if part == LAYER_INDEX else re.escape(part) for part in parts)
            last = "" if parts[-1] == LAYER_INDEX else parts[-1]
            compiled.append((last, re.compile(r"(?:^|.*\.)" + body), commons))
        return compiled

    def common_names(self, name: str, role: str | None = None) -> tuple[str, ...]:
        """Common names of the module at canonical path ``name`` (empty if it plays no role).

        Args:
            name: canonical dotted module path (engine wrapper segments already removed).
            role: only this common-name template (``"task_head"``), which is faster to test.

        Returns:
            Common names with ``$`` replaced by the layer index found in ``name``.
        """
        found: list[str] = []
        for last, pattern, commons in self._compiled:
            if (role is not None and role not in commons) or not name.endswith(last):
                continue
            match = pattern.fullmatch(name)
            if match is None:
                continue
            for common in commons:
                indices = iter(match.groups())
                found.append(
                    ".".join(next(indices) if p == LAYER_INDEX else p for p in common.split("."))
                )
        return tuple(dict.fromkeys(found))
