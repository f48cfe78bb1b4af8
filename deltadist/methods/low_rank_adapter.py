"""Low-rank adapters (the baseline of Compacter, https://arxiv.org/abs/2106.04647).

An adapter after the site, ``y = h + up(act(down(h)))``, whose projections are rank-``r`` products
``W = left @ right`` (:class:`~deltadist.methods.bottleneck.LowRankLinear`); the bottleneck is
``width // reduction_factor``. ``up``'s right factor starts at zero, so a fresh adapter is the
identity. OpenDelta multiplied the factors elementwise, which is their product only at rank 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltadist.addressing.select import Site
from deltadist.api.delta_base import DeltaBase
from deltadist.core.config import DeltaConfig, check_choice, check_positive_int
from deltadist.core.delta_module import DeltaModule
from deltadist.core.registry import register_method
from deltadist.core.shapes import site_placement, site_widths
from deltadist.errors import SiteError
from deltadist.mechanisms.hooks import AFTER
from deltadist.methods.bottleneck import ACTIVATIONS, WEIGHT_INITS, Bottleneck, LowRankLinear


@dataclass(kw_only=True)
class LowRankAdapterConfig(DeltaConfig):
    """Config of :class:`LowRankAdapterModel`."""

    delta_type = "low_rank_adapter"

    reduction_factor: int = 32
    """Bottleneck width is the site's width divided by this."""
    non_linearity: str = "gelu_new"
    """Activation between the projections."""
    low_rank_w_init: str = "glorot-uniform"
    """Initialisation of the factors: ``glorot-uniform`` or ``glorot-normal``."""
    low_rank_rank: int = 1
    """Rank of each projection's weight."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "reduction_factor")
        check_positive_int(self, "low_rank_rank")
        check_choice(self, "non_linearity", ACTIVATIONS, case_insensitive=True)
        check_choice(self, "low_rank_w_init", WEIGHT_INITS)


def bottleneck_width(width: int, reduction_factor: int, site: Site) -> int:
    """``width // reduction_factor``, refused when that is zero."""
    if width // reduction_factor < 1:
        raise SiteError(
            f"{site.name!r} is {width} wide, so reduction_factor={reduction_factor} leaves no "
            f"bottleneck; use reduction_factor <= {width}."
        )
    return width // reduction_factor


@register_method
class LowRankAdapterModel(DeltaBase):
    """Add a low-rank adapter after each selected module (default: ``attn.proj``, ``ff.w2``).

    Args:
        backbone_model: the model to modify in place.
        reduction_factor (32), non_linearity (``gelu_new``), low_rank_w_init (``glorot-uniform``),
        low_rank_rank (1): see :class:`LowRankAdapterConfig`.
        modified_modules, exclude_modules, unfrozen_modules, common_structure, delta_dtype: see
            :class:`DeltaConfig`.
    """

    delta_type = "low_rank_adapter"
    config_class = LowRankAdapterConfig
    default_modified_modules = ("attn.proj", "ff.w2")
    mechanism = AFTER
    child_name = "low_rank_adapter"
    config: LowRankAdapterConfig

    def _build_delta(self, site: Site) -> DeltaModule:
        cfg = self.config
        width = site_widths(site, self.engine)[1]
        bottleneck = bottleneck_width(width, cfg.reduction_factor, site)
        device, dtype = site_placement(site.module, cfg.delta_dtype)

        def projection(in_f: int, out_f: int, up: bool) -> LowRankLinear:
            return LowRankLinear(in_f, out_f, cfg.low_rank_rank, cfg.low_rank_w_init, start_at_zero=up,
                                 device=device, dtype=dtype)

        return Bottleneck(projection(width, bottleneck, False), projection(bottleneck, width, True),
                          cfg.non_linearity, residual=True)
