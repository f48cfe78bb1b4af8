"""Soft prompts (Lester et al. 2021, https://arxiv.org/abs/2104.08691): trained input embeddings.

``soft_token_num`` embeddings ``[P, hidden]`` are put into the sequence the model reads: before
the text of a text model (between the pads and the text of a left-padded row), before the
encoder's input of an encoder-decoder, after the class token of a vision model. The mask, token
types and position ids are spread to match, and hidden states are taken back to the caller's
length before the heads, so logits, labels and losses are the caller's (see
:mod:`deltadist.mechanisms.prompts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltadist.addressing.common import modules_with_role
from deltadist.addressing.facts import config_value
from deltadist.addressing.names import canonical_modules
from deltadist.addressing.select import Site
from deltadist.addressing.structures import VISION_SEQUENCE
from deltadist.api.delta_base import DeltaBase
from deltadist.core.config import DeltaConfig, check_positive_int, check_range
from deltadist.core.delta_module import DeltaModule
from deltadist.core.mechanism import Mechanism
from deltadist.core.registry import register_method
from deltadist.core.shapes import site_placement
from deltadist.errors import ConfigError, SiteError
from deltadist.mechanisms.prompts import PromptAfterClassTokens, PromptAtInputs, PromptInEncoder


@dataclass(kw_only=True)
class SoftPromptConfig(DeltaConfig):
    """Config of :class:`SoftPromptModel` (OpenDelta's arguments and defaults)."""

    delta_type = "soft_prompt"

    soft_token_num: int = 100
    """``P``: how many prompt embeddings."""
    init_range: float = 0.5
    """Random initialisation ``U(-init_range, init_range)`` (without ``token_init``)."""
    token_init: bool = True
    """Start from the embeddings of the first ``P`` tokens of the vocabulary (text models)."""
    other_expand_ids: dict[str, int] = field(
        default_factory=lambda: {"attention_mask": 1, "token_type_ids": 0})
    """The value per-position inputs take at prompt positions (the mask is always 1 there)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "soft_token_num")
        check_range(self, "init_range", 0.0, float("inf"))
        if self.modified_modules is not None:
            raise ConfigError(
                "A soft prompt goes where the model reads its input sequence, so modified_modules "
                "does not apply: leave it None (add prompts to another model by building a delta "
                "on that model)."
            )


class SoftPrompt(DeltaModule):
    """``P`` trained embeddings: ``soft_embeds: [P, hidden]``."""

    def __init__(self, tokens: int, width: int, init_range: float,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tokens, self.init_range = tokens, init_range
        self.soft_embeds = nn.Parameter(torch.empty(tokens, width, device=device, dtype=dtype))
        self.initialize()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.soft_embeds, -self.init_range, self.init_range)

    def merge_blocker(self, site: nn.Module) -> str | None:
        return "a soft prompt adds input positions that no weight of the model holds"

    def forward(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """``[batch, P, hidden]`` in ``dtype`` (the embeddings' dtype)."""
        return self.soft_embeds.to(dtype).unsqueeze(0).expand(batch, -1, -1)


@register_method
class SoftPromptModel(DeltaBase):
    """Put ``soft_token_num`` trained embeddings into the model's input sequence.

    Args:
        backbone_model: the model to modify in place: a transformers text model (decoder-only,
            encoder-only or encoder-decoder, also inside your own module) or a vision model
            whose structure map gives its embeddings the role ``embeddings.sequence`` (ViT).
        soft_token_num, init_range, token_init, other_expand_ids: see :class:`SoftPromptConfig`.
        unfrozen_modules, delta_dtype: see :class:`DeltaConfig`.
    """

    delta_type = "soft_prompt"
    config_class = SoftPromptConfig
    default_modified_modules = ()
    child_name = "soft_prompt"
    config: SoftPromptConfig

    def _select_sites(self, attached: frozenset[int]) -> list[Site]:
        return [_placement(self.backbone_model).site]

    def _build_delta(self, site: Site) -> DeltaModule:
        width = _width(site, self.backbone_model)
        device, dtype = site_placement(site.module, self.config.delta_dtype)
        return SoftPrompt(self.config.soft_token_num, width, self.config.init_range,
                          device=device, dtype=dtype)

    def _mechanism_for(self, target: Site) -> Mechanism:
        return _placement(self.backbone_model).mechanism(self.config)

    def _initialize_from_backbone(self) -> None:
        """``token_init``: copy the first ``P`` rows of the (logical, gathered) token embeddings."""
        embeddings = _token_embeddings(self.backbone_model)
        if not self.config.token_init or embeddings is None or embeddings.weight.is_meta:
            return
        tokens = self.config.soft_token_num
        vocabulary = self.engine.logical_shape(embeddings.weight)[0]
        if tokens > vocabulary:
            raise ConfigError(f"token_init copies the first soft_token_num={tokens} token embeddings, "
                              f"but the vocabulary has {vocabulary}. Lower soft_token_num or set "
                              "token_init=False.")
        rows = self.engine.gather({"w": embeddings.weight})["w"][:tokens]
        for param in self.record.delta_parameters().values():
            self.engine.scatter(param, rows.to(param.dtype))


class _Placement:
    """Where a model reads its sequence: the site, and the mechanism that puts a prompt there."""

    def __init__(self, site: Site, make: Any) -> None:
        self.site, self._make = site, make

    def mechanism(self, config: SoftPromptConfig) -> Any:
        return self._make(config)


def _placement(backbone: nn.Module) -> _Placement:
    modules = canonical_modules(backbone)
    names = {id(m): n for n, m in modules.items()}
    vision = modules_with_role(backbone, VISION_SEQUENCE, guess=False)
    if vision:
        name = vision[0]
        return _Placement(Site(name, modules[name]),
                          lambda cfg: PromptAfterClassTokens(backbone, class_tokens=1))
    for module in modules.values():  # outermost first
        if callable(getattr(module, "get_input_embeddings", None)) and hasattr(module, "config"):
            # The base model (the module the heads sit on): its hidden states are taken back to
            # the caller's length before any head or loss reads them.
            base = module.base_model if isinstance(getattr(module, "base_model", None), nn.Module) else module
            if getattr(base.config, "is_encoder_decoder", False) and hasattr(base, "get_encoder"):
                encoder = base.get_encoder()
                return _Placement(Site(names[id(encoder)], encoder),
                                  lambda cfg: PromptInEncoder(base, cfg.other_expand_ids))
            return _Placement(Site(names[id(base)], base),
                              lambda cfg: PromptAtInputs(base, cfg.other_expand_ids))
    raise SiteError(
        f"{type(backbone).__name__} has no module with get_input_embeddings() and a config, so "
        "there is no known place for a soft prompt. Use a transformers model (or wrap one)."
    )


def _token_embeddings(backbone: nn.Module) -> nn.Module | None:
    """The model's token embedding table, if it is a text model."""
    for module in canonical_modules(backbone).values():
        getter = getattr(module, "get_input_embeddings", None)
        if callable(getter) and hasattr(module, "config"):
            found = getter()
            return found if isinstance(found, nn.Embedding) else None
    return None


def _width(site: Site, backbone: nn.Module) -> int:
    """The hidden width of the sequence at ``site``: the model config's ``hidden_size`` (or the
    attribute the family's structure map names for it, ``d_model`` on T5)."""
    for module in (site.module, *canonical_modules(backbone).values()):
        config = getattr(module, "config", None)
        width = None if config is None else config_value(config, "hidden_size_attrs")
        if isinstance(width, int):
            return width
    raise SiteError(f"No hidden size is known for {site.name!r}: its model has no config.hidden_size.")
