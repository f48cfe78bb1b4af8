"""The base class of every delta's math: a small ``nn.Module`` attached to one site."""

from __future__ import annotations

from torch import nn


class DeltaModule(nn.Module):
    """A delta's trainable math for one site.

    Subclasses create every parameter in ``__init__`` (with the site's dtype and device, meta stays
    meta) and put their initial values in :meth:`reset_parameters`, so a model built on the meta
    device can be materialised first and initialised afterwards.
    """

    def reset_parameters(self) -> None:
        """(Re)initialise the parameters in place. Called once at construction."""
        raise NotImplementedError(f"{type(self).__name__} must define reset_parameters()")

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}:{list(p.shape)}" for n, p in self.named_parameters(recurse=False))
        return shapes
