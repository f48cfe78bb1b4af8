"""The base class of every delta's math: a small ``nn.Module`` attached to one site."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from deltadist.engines import Engine


class DeltaModule(nn.Module):
    """A delta's trainable math for one site.

    Subclasses create every parameter in ``__init__`` (with the site's device and the dtype of
    the config's ``delta_dtype`` rule; meta stays meta) and put their initial values in
    :meth:`reset_parameters`, so a model built on the meta device can be materialised first and
    initialised afterwards (they call :meth:`initialize` last in ``__init__``). A delta with a
    merged form overrides :meth:`merge_blocker` and :meth:`fold_into`.
    """

    def reset_parameters(self) -> None:
        """(Re)initialise the parameters in place (see :meth:`initialize`)."""
        raise NotImplementedError(f"{type(self).__name__} must define reset_parameters()")

    def initialize(self) -> None:
        """Initialise at construction, unless on ``meta``: values on meta are never read, and a
        meta-built model gets real ones after materialising (``prepare_model``); skipping the
        initialisers keeps attaching to a 70B meta model fast."""
        own = list(self._parameters.values())  # the common case, without walking submodules
        if not any(p is not None and p.is_meta for p in own or self.parameters()):
            self.reset_parameters()

    def fixed_parameters(self) -> list[nn.Parameter]:
        """Parameters saved with the delta but never trained (``freeze_module`` keeps them frozen)."""
        return []

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the delta computes in (its parameters'); inputs are cast to it and back."""
        return next(self.parameters()).dtype

    def merge_blocker(self, site: nn.Module) -> str | None:
        """Why this delta cannot be folded into ``site``'s weights, or ``None`` if it can."""
        return f"{type(self).__name__} has no merged form"

    def fold_into(self, site: nn.Module, engine: "Engine", sign: float) -> None:
        """Add (``sign=+1``) or subtract (``-1``) this delta's effect to ``site``'s weights.

        Called on every rank, only when :meth:`merge_blocker` is ``None``; reads and writes
        through ``engine.gather`` / ``engine.scatter`` so any sharding works.
        """
        raise NotImplementedError(f"{type(self).__name__} has no merged form")

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}:{list(p.shape)}" for n, p in self.named_parameters(recurse=False))
        return shapes
