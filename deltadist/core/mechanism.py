"""What a mechanism is, for the pieces of core that hold and re-wire attachments.

A mechanism wires one attachment's delta module into the module(s) it modifies, with forward
(pre-)hooks only, and returns their handles; :mod:`deltadist.core.attach` keeps the handles and
re-wires a module whenever its attachments change. The mechanisms that change a call live in
:mod:`deltadist.mechanisms`; the one here, :data:`HOLDER`, changes nothing: its module only holds
parameters that several sites share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from deltadist.core.attach import Attachment


class Mechanism:
    """How an attachment's delta is wired in. Subclasses implement :meth:`wire`."""

    name = "mechanism"
    copies_backbone = False
    """Whether the delta module is a trained copy of its site (a task head): its parameters are
    saved under the site's own names, not as delta parameters."""

    def modules(self, att: "Attachment") -> tuple[nn.Module, ...]:
        """The modules this attachment puts hooks on (its site, by default)."""
        return (att.site,)

    def wire(self, att: "Attachment", module: nn.Module) -> list[RemovableHandle]:
        """Register ``att``'s hooks on ``module`` (one of :meth:`modules`); return the handles."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name.upper()


class Holder(Mechanism):
    """No hooks: the delta module only holds parameters other deltas use (shared across sites)."""

    name = "holder"

    def wire(self, att: "Attachment", module: nn.Module) -> list[RemovableHandle]:
        return []


HOLDER = Holder()
