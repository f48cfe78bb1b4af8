"""Each delta's own copy of the backbone modules it keeps trainable (a task head).

A delta that keeps a backbone module trainable (the default task head, or an ``unfrozen_modules``
entry that is not a delta) trains **its own copy** of it, as PEFT's ``modules_to_save`` does: a
:class:`TrainedCopy` attached as a child of that module, whose hook replaces the module's output
with the copy's. Attaching puts the copy in service, detaching takes it out, and the backbone's
module is never written to (until ``merge``), so several deltas on one backbone each have their own
head and a ``detach`` leaves the original bit for bit. The copy's parameters are saved under the
backbone module's names (``classifier.weight``), so a checkpoint reads as before.

Which modules are copied (:func:`copy_units`): the outermost modules whose parameters are all kept
and that hold no delta site. Parameters kept without their whole module (``"bias"`` in a module
whose weight stays frozen) are trained in place: copying the module would copy its frozen weight.

Outside a mixed batch the copy attached last serves every row (the others wait); inside one, each
copy serves its delta's rows. The backbone module still runs and its output is replaced: for a task
head that is one small matrix product.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from deltadist.addressing.names import canonical_modules, canonical_name, dot_prefixes
from deltadist.core.attach import attachments_on, delta_parameter_ids
from deltadist.core.delta_module import DeltaModule
from deltadist.core.mechanism import Mechanism
from deltadist.errors import DeltaError
from deltadist.mechanisms.hooks import SiteHook, hidden_input, map_hidden
from deltadist.mechanisms.rows import rows_for

if TYPE_CHECKING:
    from deltadist.core.attach import Attachment
    from deltadist.engines import Engine

COPY_NAME = "copy"
"""Child name of a trained copy on its module (``classifier.copy.module.weight``)."""


def detached_clone(module: nn.Module, value_of: Callable[[nn.Parameter], torch.Tensor]) -> nn.Module:
    """A copy of ``module`` with fresh parameters (``value_of``: a parameter's full, unsharded
    value), copies of its buffers, and no hooks or delta children (a ``deepcopy`` would follow the
    hooks into the whole model)."""
    clone = copy.copy(module)
    state = {key: type(value)() if "hook" in key and isinstance(value, dict) else value
             for key, value in module.__dict__.items()}
    state["_parameters"] = {name: None if p is None else nn.Parameter(value_of(p), p.requires_grad)
                            for name, p in module._parameters.items()}
    state["_buffers"] = {name: None if b is None else b.detach().clone()
                         for name, b in module._buffers.items()}
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    state["_modules"] = OrderedDict((name, detached_clone(child, value_of))
                                    for name, child in module._modules.items()
                                    if child is not None and not isinstance(child, DeltaModule))
    clone.__dict__.update(state)
    return clone


class TrainedCopy(DeltaModule):
    """One delta's trained copy of a backbone module (``module``: same class, same values at first)."""

    def __init__(self, original: nn.Module, engine: "Engine") -> None:
        super().__init__()
        self.module = detached_clone(original, lambda param: _full_value(param, engine))
        self._displaced: dict[str, torch.Tensor] | None = None
        """While merged: the site's own values, which the copy's replaced."""

    def reset_parameters(self) -> None:
        """Nothing to draw: a copy's first values are its module's (:meth:`take_values`)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def take_values(self, site: nn.Module, engine: "Engine") -> None:
        """Copy the site's current values (after a meta-built backbone got its weights)."""
        mine = dict(self.module.named_parameters())
        full = engine.gather({name: param for name, param in _own_parameters(site) if name in mine})
        for name, value in full.items():
            engine.scatter(mine[name], value)

    def merge_blocker(self, site: nn.Module) -> str | None:
        merged = [a for a in attachments_on(site) if a.mechanism.copies_backbone and a.delta is not self
                  and a.delta._displaced is not None]
        return (f"another delta's copy of this module is merged into it ({merged[0].child_name}); "
                "unmerge that delta first" if merged else None)

    def fold_into(self, site: nn.Module, engine: "Engine", sign: float) -> None:
        """``+1``: the site takes the copy's values (its own are kept aside); ``-1``: it gets them back."""
        targets = {name: param for name, param in _own_parameters(site)
                   if name in dict(self.module.named_parameters())}
        if sign > 0:
            self._displaced = engine.gather(targets)
            values = engine.gather(dict(self.module.named_parameters()))
        else:
            values, self._displaced = self._displaced, None
        for name, param in targets.items():
            engine.scatter(param, values[name])


def _full_value(param: nn.Parameter, engine: "Engine") -> torch.Tensor:
    """A fresh full copy of ``param`` on its device (every rank calls it; an engine's pieces are
    gathered, and the delta's own copy is sharded again when the engine adopts it)."""
    if param.device.type == "meta":
        return torch.empty(engine.logical_shape(param), dtype=param.dtype, device="meta")
    return engine.gather({"value": param})["value"].to(param.device)


def _own_parameters(site: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    """The site's parameters without any delta's (its copy's included)."""
    deltas = delta_parameter_ids(site)
    return [(name, param) for name, param in site.named_parameters() if id(param) not in deltas]


class _ServeCopy(SiteHook):
    """Replace the site's output with the copy's: on every row while it is in service, on its own
    rows in a mixed batch."""

    def __init__(self, att: "Attachment", in_service: bool) -> None:
        super().__init__(att)
        self.in_service = in_service

    def __call__(self, site: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        trained = site._modules[self.child_name]
        if trained.call_state.rows is None:
            return trained(*args, **kwargs) if self.in_service else None
        batch = hidden_input(args, kwargs, self.label).shape[0]
        rows = rows_for(trained, batch, hidden_input(args, kwargs, self.label).device)
        if rows is None or not rows.numel():
            return None
        own = trained(*_rows_of(args, rows, batch), **_rows_of(kwargs, rows, batch))
        return map_hidden(output, lambda y: self._put_rows(y, rows, map_hidden(own, _same, self)), self)

    def _put_rows(self, y: torch.Tensor, rows: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        if own.shape[1:] != y.shape[1:]:
            raise DeltaError(
                f"mixed_batch: the {self.label} copy gives rows of shape {list(own.shape[1:])}, the "
                f"backbone's {self.site_class} {list(y.shape[1:])}; rows of one batch need heads of one "
                "width. Run these deltas in batches of their own."
            )
        return y.index_copy(0, rows, own.to(y.dtype))


def _same(value: torch.Tensor) -> torch.Tensor:
    return value


def _rows_of(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """``value`` with every tensor that has ``batch`` rows cut to ``rows`` (args or kwargs)."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows) if value.dim() and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {key: _rows_of(item, rows, batch) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows_of(item, rows, batch) for item in value)
    return value


class ServeCopy(Mechanism):
    """The site's output is its trained copy's (see the module docstring)."""

    name = "trained_copy"
    copies_backbone = True

    def wire(self, att: "Attachment", module: nn.Module) -> list[RemovableHandle]:
        live = [a for a in attachments_on(module) if a.attached and not a.suspended
                and a.mechanism.copies_backbone]
        in_service = max(live, key=lambda a: a.order) is att
        # First among the site's hooks: the copy stands for the module itself, and the other deltas
        # on this site (an adapter after it) act on its output.
        return [module.register_forward_hook(_ServeCopy(att, in_service), with_kwargs=True, prepend=True)]


SERVE_COPY = ServeCopy()


def copy_units(backbone: nn.Module, kept: Iterable[str], sites: Iterable[str]) -> list[str]:
    """The modules (canonical names) a delta keeping ``kept`` parameters trains copies of: for each
    kept parameter, its outermost enclosing module whose parameters are all kept and that holds no
    delta site (``sites``: canonical names); never the backbone itself."""
    kept_set = set(kept)
    modules = canonical_modules(backbone)
    site_list = list(sites)
    units: dict[str, None] = {}
    for name in kept_set:
        for prefix in dot_prefixes(name.rpartition(".")[0]):
            if prefix in units:
                break
            module = modules.get(prefix)
            if module is not None and _copyable(module, prefix, kept_set, site_list):
                units[prefix] = None
                break
    return sorted(units)


def _copyable(module: nn.Module, name: str, kept: set[str], sites: list[str]) -> bool:
    if not name or any(site == name or site.startswith(name + ".") for site in sites):
        return False
    own = [canonical_name(n) for n, _ in _own_parameters(module)]
    return bool(own) and all(f"{name}.{n}" in kept for n in own)
