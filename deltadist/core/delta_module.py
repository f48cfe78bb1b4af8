"""The base class of every delta's math: a small ``nn.Module`` attached to one site, and the
per-call state its mechanism reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deltadist.core.export_guard import refuse_export

if TYPE_CHECKING:
    from deltadist.engines import Engine


@dataclass(eq=False)
class CallState:
    """What a delta module's mechanism reads at the top of each call, besides the call itself.

    It lives on the delta module (``delta.call_state``), so a hook finds it from the module it runs
    on: never through a closure, a global keyed by ``id()`` or a context variable, so a compiled
    graph reads it as module state. A copy of the model (``copy.deepcopy``, pickling) keeps how the
    delta is wired (``joined``, ``order``) and none of the routing of the call or block running
    now: the copy is routed by nothing its original was routed by.
    """

    rows: torch.Tensor | None = None
    """Inside a mixed batch: the listed rows this delta serves (int64, ascending; may be empty).
    ``None``: every row."""
    listed: int = 0
    """Inside a mixed batch: how many rows the block listed."""
    group: tuple[str, ...] | None = None
    """Inside a mixed batch: the child names of the deltas of this site computed together with this
    one by its class's ``grouped_update`` when it leads them, ``()`` when another member computes
    its share, ``None`` when it runs on its own."""
    joined: bool = False
    """Whether this delta takes part in its site's calls now (attached and not suspended), for
    mechanisms without hooks (a prefix joined inside attention)."""
    order: int = 0
    """Its place among the deltas of one site (attach order), for such mechanisms."""
    pending: Any = None
    """A value one hook of this delta's call hands to another (a span's start input, a prompt's
    layout), taken out again within the call."""

    def __deepcopy__(self, memo: dict) -> "CallState":
        return CallState(joined=self.joined, order=self.order)

    def __reduce__(self) -> tuple:
        return (CallState, (None, 0, None, self.joined, self.order))


class Owner:
    """The delta object (a ``DeltaBase``) an attached delta module belongs to, held strongly so
    that a delta acting on a model stays listed by ``deltas_on`` (and keeps its name) while it is
    attached, even if nobody keeps the object ``from_finetuned`` returned. The model holds its
    delta modules, and they their owner; a copy of the model (deepcopy, pickle) holds none."""

    __slots__ = ("delta",)

    def __init__(self, delta: Any = None) -> None:
        self.delta = delta

    def __deepcopy__(self, memo: dict) -> "Owner":
        return Owner()

    def __reduce__(self) -> tuple:
        return (Owner, ())


class DeltaModule(nn.Module):
    """A delta's trainable math for one site.

    Subclasses create every parameter in ``__init__`` (with the site's device and the dtype of
    the config's ``delta_dtype`` rule; meta stays meta) and put their initial values in
    :meth:`reset_parameters`, so a model built on the meta device can be materialised first and
    initialised afterwards (they call :meth:`initialize` last in ``__init__``). A delta with a
    merged form overrides :meth:`merge_blocker` and :meth:`fold_into`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.call_state = CallState()
        self.owner = Owner()
        # While attached, an export of the model around it is refused (it would drop the delta).
        self.register_state_dict_post_hook(refuse_export)

    reads_site_output: bool = False
    """Whether a parallel mechanism calls it as ``delta(x, site_output, site)`` (DoRA rescales the
    site's own output) rather than ``delta(x)``."""

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
