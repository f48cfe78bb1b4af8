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

from deltadist.addressing.select import Site
from deltadist.api.delta_base import DeltaBase
from deltadist.attach import Mechanism
from deltadist.config import DeltaConfig
from deltadist.errors import SiteError
from deltadist.delta_module import DeltaModule
from deltadist.shapes import output_features, site_placement


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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.bias.to(hidden.dtype)


class BitFitModel(DeltaBase):
    """Train bias terms of the selected modules and of everything inside them.

    Defaults to the ``attn``, ``ff``, ``layer_norm`` and ``lm_head.proj`` roles, as OpenDelta.
    """

    delta_type = "bitfit"
    config_class = BitFitConfig
    default_modified_modules = ("attn", "ff", "layer_norm", "lm_head.proj")
    mechanism = Mechanism.AFTER
    broadcast = True
    child_name = "bitfit"

    def _targets(self, site: Site) -> list[Site]:
        prefix = f"{site.name}." if site.name else ""
        return [
            Site(f"{prefix}{name}".rstrip("."), module)
            for name, module in site.module.named_modules()
            if not isinstance(module, DeltaModule) and _bias_capable(module, self)
        ]

    def _build_delta(self, site: Site) -> DeltaModule:
        features = output_features(site.module, self.engine)
        if features is None:
            raise SiteError(f"BitFit cannot add a bias to {site.name!r} ({type(site.module).__name__}).")
        device, dtype = site_placement(site.module)
        return BiasDelta(features, device=device, dtype=dtype)


def _bias_capable(module: nn.Module, delta: DeltaBase) -> bool:
    """Linear layers and norms: modules with their own weight and a fixed output width."""
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        return False
    return output_features(module, delta.engine) is not None
