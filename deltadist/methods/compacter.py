"""Compacter (Karimi Mahabadi et al. 2021, https://arxiv.org/abs/2106.04647): adapters with PHM layers.

An adapter after the site, ``y = h + up(act(down(h)))``, whose projections are PHM layers
(:class:`~deltadist.methods.phm.PHMLinear`): ``W = sum_i A_i (x) B_i`` with ``n =
hypercomplex_division``. With ``shared_phm_rule`` every layer uses one rule ``A`` (the paper's
setting), with ``shared_W_phm`` one pair of weights ``B`` (down and up); shared tensors live once,
in a holder delta at the model root (checkpoint key ``compacter_shared.*``), so they are saved,
gathered and sharded once. OpenDelta refused both options.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltadist.addressing.select import Site
from deltadist.api.delta_base import DeltaBase
from deltadist.core.config import DeltaConfig, check_choice, check_positive_int, check_range
from deltadist.core.delta_module import DeltaModule
from deltadist.core.registry import register_method
from deltadist.core.shapes import site_placement, site_widths
from deltadist.errors import ConfigError, SiteError
from deltadist.mechanisms.hooks import AFTER
from deltadist.methods.bottleneck import ACTIVATIONS, WEIGHT_INITS, Bottleneck, unlearned_parameters
from deltadist.methods.low_rank_adapter import bottleneck_width
from deltadist.methods.phm import PHMLinear, PHMRule, PHMWeight

SHARED_NAME = "compacter_shared"
"""Child name (and checkpoint key prefix) of the holder of shared rules and weights."""


@dataclass(kw_only=True)
class CompacterConfig(DeltaConfig):
    """Config of :class:`CompacterModel` (OpenDelta's arguments and defaults)."""

    delta_type = "compacter"

    reduction_factor: int = 16
    """Bottleneck width is the site's width divided by this."""
    non_linearity: str = "gelu_new"
    """Activation between the projections."""
    phm_c_init: str = "normal"
    """Initialisation of the rule: ``normal`` (``N(0, phm_init_range)``) or ``uniform`` (``U(-1, 1)``)."""
    hypercomplex_division: int = 4
    """``n``: the number of Kronecker summands; widths must be divisible by it."""
    learn_phm: bool = True
    """Whether the rule is trained (otherwise it keeps its initial values, which are saved)."""
    hypercomplex_nonlinearity: str = "glorot-uniform"
    """Initialisation of the weights ``B``: ``glorot-uniform``, ``glorot-normal`` or ``normal``."""
    shared_phm_rule: bool = False
    """One rule for every layer of every site."""
    factorized_phm: bool = True
    """``B_i`` as a rank-``phm_rank`` product."""
    shared_W_phm: bool = False
    """One down and one up weight ``B`` for every site (all sites must be equally wide)."""
    factorized_phm_rule: bool = False
    """``A_i`` as a rank-one product."""
    phm_rank: int = 1
    """Rank of the factorised ``B_i``."""
    phm_init_range: float = 0.0001
    """Standard deviation of the ``normal`` initialisations."""
    kronecker_prod: bool | None = None
    """Build ``W`` explicitly before multiplying (``True``), contract the factors (``False``), or
    whichever is cheaper for each call's shape (``None``); the same function either way."""
    use_bias_up_sampler: bool = True
    """A bias on the up projection."""
    use_bias_down_sampler: bool = True
    """A bias on the down projection."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("reduction_factor", "hypercomplex_division", "phm_rank"):
            check_positive_int(self, name)
        check_range(self, "phm_init_range", 0.0, float("inf"))
        check_choice(self, "non_linearity", ACTIVATIONS, case_insensitive=True)
        check_choice(self, "phm_c_init", ("normal", "uniform"))
        check_choice(self, "hypercomplex_nonlinearity", (*WEIGHT_INITS, "normal"))


class CompacterShared(DeltaModule):
    """The rule and/or weights every site's PHM layers share (no hooks: sites call its children)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self.initialize()

    def reset_parameters(self) -> None:
        for module in self.children():
            module.reset_parameters()

    def fixed_parameters(self) -> list[nn.Parameter]:
        return unlearned_parameters(self)

    def forward(self) -> None:
        raise TypeError("compacter_shared only holds shared tensors; its children are called by the sites.")


@register_method
class CompacterModel(DeltaBase):
    """Add a Compacter layer after each selected module (default: ``attn.proj``, ``ff.w2``).

    Args:
        backbone_model: the model to modify in place.
        reduction_factor, non_linearity, phm_c_init, hypercomplex_division, learn_phm,
        hypercomplex_nonlinearity, shared_phm_rule, factorized_phm, shared_W_phm,
        factorized_phm_rule, phm_rank, phm_init_range, kronecker_prod, use_bias_up_sampler,
        use_bias_down_sampler: see :class:`CompacterConfig`.
        modified_modules, exclude_modules, unfrozen_modules, common_structure, delta_dtype: see
            :class:`DeltaConfig`.
    """

    delta_type = "compacter"
    config_class = CompacterConfig
    default_modified_modules = ("attn.proj", "ff.w2")
    mechanism = AFTER
    child_name = "compacter"
    shared_name = SHARED_NAME
    config: CompacterConfig

    def _build_shared(self, targets: list[Site]) -> CompacterShared | None:
        cfg = self.config
        if not (cfg.shared_phm_rule or cfg.shared_W_phm) or not targets:
            return None
        shared: dict[str, nn.Module] = {}
        device, dtype = site_placement(targets[0].module, cfg.delta_dtype)
        if cfg.shared_phm_rule:
            shared["phm_rule"] = self._rule(device, dtype)
        if cfg.shared_W_phm:
            widths = {site_widths(t, self.engine)[1] for t in targets}
            if len(widths) != 1:
                raise ConfigError(
                    f"shared_W_phm needs every site equally wide, but these are {sorted(widths)} wide. "
                    "Select sites of one width, or set shared_W_phm=False."
                )
            width = widths.pop()
            bottleneck = self._bottleneck(width, targets[0])
            shared["down_weight"] = self._weight(width, bottleneck, device, dtype)
            shared["up_weight"] = self._weight(bottleneck, width, device, dtype)
        return CompacterShared(shared)

    def _bottleneck(self, width: int, site: Site) -> int:
        n = self.config.hypercomplex_division
        bottleneck = bottleneck_width(width, self.config.reduction_factor, site)
        if width % n or bottleneck % n:
            raise SiteError(
                f"Compacter at {site.name!r}: the width {width} and the bottleneck {bottleneck} "
                f"(width // reduction_factor) must be divisible by hypercomplex_division={n}. "
                "Change reduction_factor or hypercomplex_division."
            )
        return bottleneck

    def _rule(self, device, dtype) -> PHMRule:  # noqa: ANN001 - torch device/dtype
        cfg = self.config
        return PHMRule(cfg.hypercomplex_division, cfg.factorized_phm_rule, cfg.phm_c_init,
                       cfg.phm_init_range, learned=cfg.learn_phm, device=device, dtype=dtype)

    def _weight(self, in_f: int, out_f: int, device, dtype) -> PHMWeight:  # noqa: ANN001
        cfg = self.config
        return PHMWeight(cfg.hypercomplex_division, in_f, out_f, cfg.factorized_phm, cfg.phm_rank,
                         cfg.hypercomplex_nonlinearity, cfg.phm_init_range, device=device, dtype=dtype)

    def _build_delta(self, site: Site) -> DeltaModule:
        cfg = self.config
        width = site_widths(site, self.engine)[1]
        bottleneck = self._bottleneck(width, site)
        device, dtype = site_placement(site.module, cfg.delta_dtype)
        shared = dict(self._shared.named_children()) if self._shared is not None else {}

        def projection(in_f: int, out_f: int, which: str, bias: bool) -> PHMLinear:
            own_rule, own_weight = "phm_rule" not in shared, f"{which}_weight" not in shared
            rule = self._rule(device, dtype) if own_rule else shared["phm_rule"]
            weight = self._weight(in_f, out_f, device, dtype) if own_weight else shared[f"{which}_weight"]
            return PHMLinear(in_f, out_f, rule, weight, own_rule=own_rule, own_weight=own_weight,
                             kronecker_prod=cfg.kronecker_prod, bias=bias, device=device, dtype=dtype)

        return Bottleneck(projection(width, bottleneck, "down", cfg.use_bias_down_sampler),
                          projection(bottleneck, width, "up", cfg.use_bias_up_sampler),
                          cfg.non_linearity, residual=True)
