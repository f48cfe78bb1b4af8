"""Adapters (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751): a bottleneck after the site.

``y = h + up(act(down(h)))`` with ``h`` the site's output: ``down: [width, bottleneck_dim]``
(``N(0, 0.01)``), ``up: [bottleneck_dim, width]`` (zero, so a fresh adapter is the identity).
Placed, as OpenDelta 0.3 does, after the attention output projection and the second feed-forward
layer, before their residual and layer norm.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltadist.addressing.select import Site
from deltadist.api.delta_base import DeltaBase
from deltadist.core.config import DeltaConfig, check_choice, check_positive_int
from deltadist.core.delta_module import DeltaModule
from deltadist.core.registry import register_method
from deltadist.core.shapes import site_placement, site_widths
from deltadist.mechanisms.hooks import AFTER
from deltadist.methods.bottleneck import ACTIVATIONS, AdapterLinear, Bottleneck


@dataclass(kw_only=True)
class AdapterConfig(DeltaConfig):
    """Config of :class:`AdapterModel`."""

    delta_type = "adapter"

    bottleneck_dim: int = 24
    """Width of the bottleneck."""
    non_linearity: str = "gelu_new"
    """Activation between the projections: a key of ``ACTIVATIONS`` (``gelu_new``, ``relu``...)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "bottleneck_dim")
        check_choice(self, "non_linearity", ACTIVATIONS, case_insensitive=True)


@register_method
class AdapterModel(DeltaBase):
    """Add a sequential bottleneck adapter after each selected module.

    Args:
        backbone_model: the model to modify in place.
        bottleneck_dim: bottleneck width (default 24). non_linearity: activation (default
            ``gelu_new``).
        modified_modules: modules whose output the adapter transforms (default: the
            ``attn.proj`` and ``ff.w2`` roles); a linear layer, a norm or a block whose output is
            the hidden states.
        exclude_modules, unfrozen_modules, common_structure, delta_dtype: see :class:`DeltaConfig`.
    """

    delta_type = "adapter"
    config_class = AdapterConfig
    default_modified_modules = ("attn.proj", "ff.w2")
    mechanism = AFTER
    child_name = "adapter"
    config: AdapterConfig

    def _build_delta(self, site: Site) -> DeltaModule:
        width = site_widths(site, self.engine)[1]
        device, dtype = site_placement(site.module, self.config.delta_dtype)
        bottleneck = self.config.bottleneck_dim
        return Bottleneck(
            AdapterLinear(width, bottleneck, start_at_zero=False, device=device, dtype=dtype),
            AdapterLinear(bottleneck, width, start_at_zero=True, device=device, dtype=dtype),
            self.config.non_linearity, residual=True,
        )
