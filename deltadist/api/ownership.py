"""Who owns which backbone parameters: the rules a delta's construction and freezing check.

A delta keeps backbone parameters trainable and saves them (a task head) by its
``unfrozen_modules``. Where it can, it trains its own copy of their module
(:mod:`deltadist.mechanisms.copies`), so deltas do not share heads; a parameter trained in place has
one owning delta, since a second delta training or loading it would silently overwrite the first
one's values.
"""

from __future__ import annotations

from torch import nn

from deltadist.addressing.common import modules_with_role
from deltadist.addressing.names import canonical_name, canonical_parameters
from deltadist.addressing.select import DELTAS_KEYWORD, Site, select_kept_parameters
from deltadist.addressing.structures import TASK_HEAD
from deltadist.core import attach as mechanisms
from deltadist.core.quantized import is_quantized
from deltadist.core.record import DeltaRecord, kept_by_other_deltas
from deltadist.engines import Engine
from deltadist.errors import ConfigError, DeltaError, EngineError, SiteError
from deltadist.mechanisms.copies import TrainedCopy, copy_units


def check_attachable(engine: Engine, backbone: nn.Module, loading_from: str | None) -> None:
    """Raise if new parameters cannot join ``backbone`` now; when loading a checkpoint
    (``loading_from``), the error points to ``load_finetuned``, which loads into a delta already
    there."""
    try:
        engine.check_attachable(backbone)
    except EngineError as err:
        if loading_from is None:
            raise
        raise EngineError(
            f"{err} To resume a delta that is already attached (built before wrapping), load "
            f"into it on every rank: delta.load_finetuned({loading_from!r})."
        ) from err


def default_unfrozen(backbone: nn.Module) -> list[str]:
    """``"deltas"`` plus the model's task head (each delta trains its own copy of it) -- unless
    another delta trains that head in place (see :func:`check_single_owner`)."""
    taken = kept_by_other_deltas(backbone)
    heads = [h for h in modules_with_role(backbone, TASK_HEAD, guess=False)
             if not any(n == h or n.startswith(h + ".") for n in taken)]
    return [DELTAS_KEYWORD, *heads]


def resolve_unfrozen(backbone: nn.Module, unfrozen: list[str] | None, *, loading: bool, sites: list[str],
                     this: DeltaRecord | None = None) -> tuple[list[str], tuple[str, ...], list[str]]:
    """The ``unfrozen_modules`` patterns (explicit), the backbone parameters they keep, and the
    modules the delta trains copies of (``sites``: the delta's own site names; ``this``: its record,
    once it has one).

    Raises:
        AddressingError: a pattern keeps no backbone parameter.
        ConfigError: a parameter trained in place is another delta's already, or is stored in 4 bits.
    """
    if unfrozen is None:
        unfrozen = default_unfrozen(backbone)
    kept = select_kept_parameters(backbone, unfrozen, mechanisms.delta_parameter_ids(backbone))
    refuse_training_quantized(backbone, kept)
    units = copy_units(backbone, kept, [*sites, *modified_sites(backbone)])
    in_place = tuple(n for n in kept if not any(n.startswith(unit + ".") for unit in units))
    check_single_owner(backbone, in_place, this, loading)
    return list(unfrozen), kept, units


def refuse_training_quantized(backbone: nn.Module, kept: tuple[str, ...]) -> None:
    """A kept backbone parameter (a task head, trained in place or as the delta's copy) cannot be
    stored in 4 bits: its values are codes, not numbers an optimizer can step."""
    params = canonical_parameters(backbone) if kept else {}
    quantized = [name for name in kept if name in params and is_quantized(params[name])]
    if quantized:
        raise ConfigError(
            f"{', '.join(quantized[:5])}: stored in 4 bits, so the delta cannot train them (the task "
            "head is kept by default). Load those modules in full precision (bitsandbytes: "
            "BitsAndBytesConfig(llm_int8_skip_modules=[...]); quantize='nf4' leaves task heads out), "
            "or leave them out of unfrozen_modules (e.g. ['deltas'])."
        )


def modified_sites(backbone: nn.Module, copied: bool = False) -> list[str]:
    """Canonical names of the modules deltas on ``backbone`` modify (``copied``: instead, those
    deltas serve from a trained copy)."""
    return [canonical_name(name.rpartition(".")[0]) for name, module in
            mechanisms.delta_modules(backbone).items() if isinstance(module, TrainedCopy) == copied]


def refuse_sites_in_copies(backbone: nn.Module, targets: list[Site]) -> None:
    """A delta cannot modify a module another delta serves from its trained copy (or anything in
    it): the copy's output replaces the module's, so the new delta would be silently skipped."""
    copied = modified_sites(backbone, copied=True)
    inside = [t.name for t in targets for unit in copied if t.name == unit or t.name.startswith(unit + ".")]
    if inside:
        raise SiteError(
            f"{', '.join(inside[:5])}: another delta on this backbone trains its own copy of this "
            "module (a task head), whose output replaces it. Leave it out of modified_modules "
            "(exclude_modules), or detach and unload that delta first. Nothing was changed."
        )


def check_single_owner(backbone: nn.Module, kept: tuple[str, ...], this: DeltaRecord | None,
                       loading: bool) -> None:
    """One backbone parameter has one owning delta: a second one training or loading it would
    silently overwrite the first one's trained values (a shared task head)."""
    shared = [name for name in kept if name in kept_by_other_deltas(backbone, this)]
    if shared:
        fix = ("load it onto its own copy of the backbone" if loading else
               "leave them out of unfrozen_modules / exclude (e.g. ['deltas']), or build this "
               "delta on its own copy of the backbone")
        raise ConfigError(
            f"Another delta on this backbone already trains and saves {', '.join(shared[:5])}; "
            f"this one would overwrite them. To keep both, {fix}."
        )


def refuse_stacking_on_a_resume(engine: Engine, child_name: str, targets: list[Site], path: str) -> None:
    """In a distributed run, loading onto sites that carry this kind of delta is a resume.

    A DDP-wrapped backbone looks unwrapped from inside, and a second delta stacked there
    would not be reduced across ranks: the ranks would drift apart without an error.
    """
    if engine.world_size <= 1:
        return
    taken = [t.name for t in targets if any(
        a.attached and a.base_name == child_name for a in mechanisms.attachments_on(t.module)
    )]
    if taken:
        raise DeltaError(
            f"These sites already carry a {child_name} delta: {', '.join(taken[:5])}. In a "
            "distributed run from_finetuned() does not stack a second one (it would not be "
            f"synchronised once the model is wrapped). To resume: delta.load_finetuned({path!r}) "
            "on every rank. To stack a second delta: attach it before wrapping, then "
            "load_finetuned() into it."
        )
