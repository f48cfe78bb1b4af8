"""Parallel adapters (He et al. 2022, https://arxiv.org/abs/2110.04366): a bottleneck beside the site.

``y = f(x) + scaled * up(act(down(x)))`` with ``x`` the site's input. A site is a module (the
adapter reads its input and adds to its output) or a pair ``[start, end]`` of modules (it reads
``start``'s input and adds to ``end``'s output): a feed-forward block that is not one module
(BERT's ``intermediate`` and ``output``) is the pair ``["ff.w1", "ff.w2"]``. The defaults are the
attention block and that feed-forward span. OpenDelta never applied ``scaled`` (its layers were
built without it) and read ``modified_modules`` as a flat list of pairs; deltadist applies the
scale and takes pairs as two-item lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from deltadist.addressing.select import Site, select_sites
from deltadist.api.delta_base import DeltaBase
from deltadist.core.config import DeltaConfig, check_choice, check_positive_int, check_range
from deltadist.core.delta_module import DeltaModule
from deltadist.core.registry import register_method
from deltadist.core.shapes import site_placement, site_widths
from deltadist.errors import AddressingError, ConfigError
from deltadist.mechanisms.hooks import PARALLEL
from deltadist.methods.bottleneck import ACTIVATIONS, AdapterLinear, Bottleneck


@dataclass(kw_only=True)
class ParallelAdapterConfig(DeltaConfig):
    """Config of :class:`ParallelAdapterModel`; ``modified_modules`` items may be ``[start, end]``."""

    delta_type = "parallel_adapter"

    bottleneck_dim: int = 24
    """Width of the bottleneck."""
    non_linearity: str = "gelu_new"
    """Activation between the projections."""
    scaled: float = 1.0
    """Multiplies the adapter's output before it is added (He et al. use 4 beside the FFN)."""

    EXPECTED = {**DeltaConfig.EXPECTED, "modified_modules": "a list of module name patterns and [start, end] "
                "pairs of them, one pattern string, or None"}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "bottleneck_dim")
        check_choice(self, "non_linearity", ACTIVATIONS, case_insensitive=True)
        check_range(self, "scaled", -float("inf"), float("inf"))

    def _pattern(self, field_name: str, item: Any, value: Any) -> Any:
        if field_name == "modified_modules" and isinstance(item, (list, tuple)):
            if len(item) != 2 or not all(isinstance(p, str) for p in item):
                raise ConfigError(
                    f"modified_modules: a span is a [start, end] pair of module patterns, got {item!r}."
                )
            return list(item)
        return super()._pattern(field_name, item, value)


@register_method
class ParallelAdapterModel(DeltaBase):
    """Add a parallel adapter beside each selected module or ``[start, end]`` span.

    Args:
        backbone_model: the model to modify in place.
        bottleneck_dim (24), non_linearity (``gelu_new``), scaled (1.0): see
            :class:`ParallelAdapterConfig`.
        modified_modules: modules and ``[start, end]`` spans (default: the ``attn`` block and the
            ``["ff.w1", "ff.w2"]`` span).
        exclude_modules, unfrozen_modules, common_structure, delta_dtype: see :class:`DeltaConfig`.
    """

    delta_type = "parallel_adapter"
    config_class = ParallelAdapterConfig
    default_modified_modules = ("attn", ("ff.w1", "ff.w2"))  # type: ignore[assignment]
    mechanism = PARALLEL
    child_name = "parallel_adapter"
    config: ParallelAdapterConfig

    def _select_sites(self, attached: frozenset[int]) -> list[Site]:
        cfg = self.config
        use_defaults = cfg.modified_modules is None
        patterns = list(self.default_modified_modules if use_defaults else cfg.modified_modules)
        singles = [p for p in patterns if isinstance(p, str)]
        spans = [tuple(p) for p in patterns if not isinstance(p, str)]

        def select(names: Sequence[str]) -> list[Site]:
            return select_sites(self.backbone_model, None if use_defaults else names, names,
                                cfg.exclude_modules, cfg.common_structure, skip=attached)

        sites = select(singles) if singles else []
        for start_pattern, end_pattern in spans:
            starts, ends = select([start_pattern]), select([end_pattern])
            sites.extend(self._pair(starts, ends, start_pattern, end_pattern))
        return sites

    @staticmethod
    def _pair(starts: list[Site], ends: list[Site], start_pattern: str, end_pattern: str) -> list[Site]:
        """Span sites: the i-th ``start`` match with the i-th ``end`` match, in module order."""
        if len(starts) != len(ends):
            raise AddressingError(
                f"The span [{start_pattern!r}, {end_pattern!r}] needs as many start modules as end "
                f"modules, but {start_pattern!r} selects {len(starts)} and {end_pattern!r} {len(ends)}. "
                "Narrow the patterns so each start pairs with one end (one per layer)."
            )
        return [Site(end.name, end.module, start_name=start.name, start=start.module)
                for start, end in zip(starts, ends)]

    def _build_delta(self, site: Site) -> DeltaModule:
        cfg = self.config
        start = Site(site.start_name, site.start) if site.start is not None else site
        width_in, width_out = site_widths(start, self.engine)[0], site_widths(site, self.engine)[1]
        device, dtype = site_placement(site.module, cfg.delta_dtype)
        return Bottleneck(
            AdapterLinear(width_in, cfg.bottleneck_dim, start_at_zero=False, device=device, dtype=dtype),
            AdapterLinear(cfg.bottleneck_dim, width_out, start_at_zero=True, device=device, dtype=dtype),
            cfg.non_linearity, residual=False, scale=cfg.scaled,
        )
