"""``interactive_modify``: a delta's construction with its modules picked on the picker page."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from deltadist.api import ownership
from deltadist.core import attach as mechanisms
from deltadist.core import naming
from deltadist.core.config import DeltaConfig
from deltadist.errors import DeltaError
from deltadist.interactive import picker

if TYPE_CHECKING:
    from deltadist.api.delta_base import DeltaBase


def setup_interactively(delta: "DeltaBase", config: DeltaConfig, backbone_model: nn.Module, port: int,
                        host: str, timeout: float | None, open_browser: bool) -> None:
    """``delta``'s construction (``_setup``) with the modules picked on the page, served on
    ``host:port``; what fails whatever is picked fails before the page opens."""

    def picked(patterns: list[str]) -> DeltaConfig:
        return config.replace(modified_modules=patterns, exclude_modules=None, common_structure=False)

    picked(["any"])  # a method that places itself (soft prompts) takes no modified_modules
    delta.backbone_model = backbone_model
    ownership.check_attachable(delta.engine, backbone_model, None)
    naming.claim_name(backbone_model, delta.delta_type, config.delta_name)
    given = config.modified_modules is not None
    picker.pick_modules(
        backbone_model, lambda patterns: delta._setup(picked(patterns), backbone_model),
        title=f"{type(delta).__name__} on {type(backbone_model).__name__}", broadcast=delta.broadcast,
        initial=_preview_sites(delta, config, backbone_model) if given else (),
        defaults=_preview_sites(delta, config.replace(modified_modules=None), backbone_model),
        port=port, host=host, timeout=timeout, open_browser=open_browser,
    )


def _preview_sites(delta: "DeltaBase", config: DeltaConfig, backbone_model: nn.Module) -> list[str]:
    """Names of the sites ``config`` selects on ``backbone_model`` (none if it selects nothing)."""
    delta.backbone_model, delta.config = backbone_model, config
    attached = frozenset(id(m) for m in mechanisms.delta_modules(backbone_model).values())
    try:
        return [site.name for site in delta._select_sites(attached)]
    except DeltaError:
        return []
