"""BitFit (Ben Zaken et al. 2021, https://arxiv.org/abs/2106.10199): train only bias terms.

deltadist trains every bias as an additive offset ``y = f(x) + delta_b`` with ``delta_b`` starting
at zero, on every bias-capable module (linear layers and norms) inside the selected modules. For a
module that already has a bias this is the same function and the same gradient as unfreezing that
bias (``d loss / d delta_b == d loss / d b``), so training follows the same path; for modules
without one (T5, Llama) it adds the missing bias. Unlike OpenDelta, which trained existing biases
in place, the backbone is never written to: detach restores it bit-exactly, the checkpoint names
only deltas, and no backbone tensor needs gathering under sharding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltadist.addressing.names import canonical_modules, parse_patterns
from deltadist.addressing.select import Site
from deltadist.api.delta_base import DeltaBase
from deltadist.core.config import DeltaConfig
from deltadist.core.delta_module import DeltaModule
from deltadist.core.registry import register_method
from deltadist.core.shapes import output_features, site_placement
from deltadist.engines import Engine
from deltadist.errors import SiteError
from deltadist.mechanisms.hooks import AFTER


@dataclass(kw_only=True)
class BitFitConfig(DeltaConfig):
    """Config of :class:`BitFitModel` (only the common fields)."""

    delta_type = "bitfit"


class BiasDelta(DeltaModule):
    """A trainable bias added to a site's output: ``[..., features] -> [..., features]``."""

    def __init__(self, features: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.empty(features, device=device, dtype=dtype))
        self.initialize()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden: [..., features]`` -> the same shape and dtype, offset by the bias."""
        return hidden + self.bias.to(hidden.dtype)

    def merge_blocker(self, site: nn.Module) -> str | None:
        if isinstance(getattr(site, "bias", None), torch.Tensor):
            return None
        return (f"{type(site).__name__} has no bias of its own to fold the offset into (BitFit "
                "added one; from_pretrained would not know it)")

    def fold_into(self, site: nn.Module, engine: Engine, sign: float) -> None:
        """``b += sign * delta_b``."""
        full = engine.gather({"b": site.bias, "d": self.bias})
        engine.scatter(site.bias, (full["b"].float() + sign * full["d"].float()).to(full["b"].dtype))


@register_method
class BitFitModel(DeltaBase):
    """Train bias terms of the selected modules and of everything inside them.

    Defaults to the ``attn``, ``ff``, ``layer_norm`` and ``lm_head.proj`` roles, as OpenDelta.
    ``exclude_modules`` also removes modules inside a selected one. ``merge()`` folds the offsets
    into existing biases (sites without a bias of their own cannot be merged).
    """

    delta_type = "bitfit"
    config_class = BitFitConfig
    default_modified_modules = ("attn", "ff", "layer_norm", "lm_head.proj")
    mechanism = AFTER
    broadcast = True
    child_name = "bitfit"

    def _targets(self, site: Site) -> list[Site]:
        """Every bias-capable module inside ``site``, minus ``exclude_modules`` and every delta's
        own modules (an adapter's linear layers are not the backbone's)."""
        excludes = parse_patterns(self.config.exclude_modules)
        inside = canonical_modules(site.module)
        skipped = [n for n, m in inside.items() if isinstance(m, DeltaModule)]
        targets = []
        for name, module in inside.items():
            full = ".".join(part for part in (site.name, name) if part)
            if any(n == "" or name == n or name.startswith(n + ".") for n in skipped):
                continue
            if any(e.matches_within(full) for e in excludes):
                continue
            if _bias_capable(module, self):
                targets.append(Site(full, module))
        return targets

    def _build_delta(self, site: Site) -> DeltaModule:
        features = output_features(site.module, self.engine)
        if features is None:
            raise SiteError(f"BitFit cannot add a bias to {site.name!r} ({type(site.module).__name__}).")
        device, dtype = site_placement(site.module, self.config.delta_dtype)
        return BiasDelta(features, device=device, dtype=dtype)


def _bias_capable(module: nn.Module, delta: DeltaBase) -> bool:
    """Linear layers and norms: modules with their own weight and a fixed output width."""
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        return False
    return output_features(module, delta.engine) is not None
