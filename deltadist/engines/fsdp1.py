"""FSDP1 (``FullyShardedDataParallel(..., use_orig_params=True)``): flat sharded views.

With ``use_orig_params=True`` every original parameter stays the same ``nn.Parameter`` object, but
outside forward its data is this rank's piece of it: a 1-D view (possibly empty) of the unit's
flat shard. Laid end to end in rank order *within the unit's sharding group* the pieces are the
flattened parameter, so a delta is gathered by collecting the pieces over that group and reshaping
to its logical shape, which deltadist records before wrapping (FSDP1 keeps no trace of it on the
parameter). The group is the whole world for ``FULL_SHARD`` and ``SHARD_GRAD_OP``, the ranks of
one replica for ``HYBRID_SHARD``; under ``NO_SHARD`` every rank holds the whole parameter. FSDP1
marks the parameters it manages with ``_fsdp_flattened``; that is how this engine recognises them,
and each unit's handle (a private but frozen FSDP1 structure) says how it shards.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deltadist.engines.base import Engine, on_meta, record_logical_shapes, recorded_shape
from deltadist.engines.distributed import (
    DistributedEngine,
    all_gather_pieces,
    distributed_ready,
    piece_offsets,
    sample_from_pieces,
)
from deltadist.engines.wrapping import repeated_blocks
from deltadist.errors import ConfigError, EngineError

FSDP1_FLAG = "_fsdp_flattened"
FLAT_PARAMETER = "_flat_param"
"""The name FSDP1 registers its flat parameter under when it removes the original ones
(``use_orig_params=False``); with ``use_orig_params=True`` the originals stay registered."""


def is_flat_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is a view into one of FSDP1's flat parameters."""
    return bool(getattr(param, FSDP1_FLAG, False))


class FSDP1Engine(DistributedEngine):
    """Engine for models wrapped in FSDP1 with ``use_orig_params=True``."""

    name = "fsdp1"
    quantized_weights_problem = "FSDP1 flattens each unit's parameters into one plain tensor; fsdp2 holds NF4"
    shards_parameters = True
    forwards_together = True
    generation_problem = "the root unit's parameters are gathered only when the wrapper is called"
    half_precision_problem = ("FSDP1 flattens each unit's parameters into one tensor of one dtype, and the "
                              "deltas stay fp32; engine fsdp2 keeps them apart")

    # FSDP1's own state-dict hook on the root unit, which wraps the backbone from outside and so
    # runs after deltadist's, requires every parameter it manages to be in the dict.
    trainable_only_state_dict = False

    @classmethod
    def wrap(cls, model: nn.Module, device: torch.device) -> nn.Module:
        """One FSDP1 unit per repeated block and one around the model (``use_orig_params=True``)."""
        return _wrap_fsdp1(model, device)

    def __init__(self, handles: dict[int, Any] | None = None, starts: dict[int, int] | None = None) -> None:
        self._handles = handles or {}
        """``id(original parameter)`` -> the FSDP1 handle of the unit that shards it."""
        self._starts = starts or {}
        """``id(original parameter)`` -> where this rank's piece of it begins (flat position), as the
        handle's shard metadata says; asked of the group (a collective) where it is not known."""
        # The root unit usually wraps the backbone from outside, where the backbone cannot see it
        # (until FSDP1's lazy init links every unit's handle): its parameters (a task head) get the
        # sharding of the units inside, which one wrapping call gives one strategy and group.
        self._default = next(iter(self._handles.values()), None)

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        return distributed_ready() and any(is_flat_sharded(p) for p in model.parameters())

    @classmethod
    def for_model(cls, model: nn.Module) -> "FSDP1Engine":
        if any(name == FLAT_PARAMETER or name.endswith("." + FLAT_PARAMETER)
               for name, _ in model.named_parameters()):
            raise EngineError(
                "This model is wrapped in FullyShardedDataParallel with use_orig_params=False, "
                "which takes every parameter (the deltas' too) out of its module into one flat "
                "parameter: deltas could not be found, saved or loaded. Wrap with "
                "use_orig_params=True (deltadist.wrap_model does), or use FSDP2 (fully_shard)."
            )
        handles, starts = {}, {}
        for unit in _units(model):
            linked = getattr(getattr(unit, "_exec_order_data", None), "all_handles", None) or []
            for handle in [unit._handle, *linked]:
                if handle is not None:
                    flat = handle.flat_param
                    handles.update((id(p), handle) for p in flat._params or ())
                    # One entry per original parameter, aligned with _params (FSDP1 is frozen upstream).
                    for param, info in zip(flat._params or (), getattr(flat, "_shard_param_infos", ())):
                        starts[id(param)] = info.intra_param_start_idx if info.in_shard else 0
        return cls(handles, starts)

    def _piece_start(self, param: torch.Tensor, group: Any) -> int:
        """Flat position in ``param`` where this rank's piece begins (``group``: its sharding group)."""
        start = self._starts.get(id(param))
        if start is None:
            return piece_offsets(param.numel(), group)[dist.get_rank(group)]
        return start

    def _sharding(self, param: torch.Tensor) -> tuple[bool, Any]:
        """Whether ``param`` is a piece of a flat shard, and the group its pieces span."""
        handle = self._handles.get(id(param), self._default)
        if handle is None:  # no unit seen at all: FSDP1's default, sharded over the world
            return is_flat_sharded(param), None
        return handle.uses_sharded_strategy, handle.process_group

    def settle(self, model: nn.Module) -> None:
        # After a forward FSDP1 keeps the root unit's gathered (unsharded) copy for the backward
        # that usually follows, and a next forward reuses it without gathering: values written
        # into the shards in between (a load, a merge, e.g. of a task head at the root) would be
        # ignored. Dropping that copy, as a backward would, makes the next forward gather again.
        for handle in _handles_holding_a_gathered_copy(model):
            handle.reshard(True)
            handle.post_reshard()
            handle._prefetched = False

    def check_attachable(self, model: nn.Module) -> None:
        raise EngineError(
            "FullyShardedDataParallel has already flattened this model's parameters, so new delta "
            "parameters would not be sharded or gradient-reduced. Attach deltas before wrapping "
            "(or use deltadist.prepare_model)."
        )

    def logical_shape(self, param: torch.Tensor) -> torch.Size:
        if not self._sharding(param)[0]:
            return param.shape
        shape = recorded_shape(param)
        if shape is None:
            raise EngineError(
                "This parameter was wrapped by FSDP1 before deltadist saw it, so its full shape is "
                "unknown. Build the delta (LoraModel(...), from_finetuned(...)) before wrapping the "
                "model in FullyShardedDataParallel."
            )
        return shape

    def _full_tensor(self, param: torch.Tensor) -> torch.Tensor:
        sharded, group = self._sharding(param)
        if not sharded:
            return param.reshape(self.logical_shape(param))
        pieces = all_gather_pieces(param.detach().reshape(-1), group)
        return torch.cat(pieces).reshape(self.logical_shape(param))

    def scatter(self, param: torch.Tensor, value: torch.Tensor) -> None:
        sharded, group = self._sharding(param)
        if not sharded:
            return super().scatter(param, value.reshape(param.shape))
        start = self._piece_start(param, group)
        piece = value.reshape(-1)[start:start + param.numel()]
        with torch.no_grad():
            param.view(-1).copy_(piece.to(device=param.device, dtype=param.dtype))

    def sample(self, param: torch.Tensor, flat_indices: torch.Tensor) -> torch.Tensor | None:
        sharded, group = self._sharding(param)
        if not sharded:
            return super().sample(param, flat_indices)
        start = self._piece_start(param, group)
        return sample_from_pieces(param, start, flat_indices, group)


def _handles_holding_a_gathered_copy(model: nn.Module) -> list:
    """FSDP1 handles (flat parameters) of ``model``'s units that sit idle with a gathered copy.

    The root unit usually wraps ``model`` from outside; every unit inside shares the root's list
    of all handles (``_exec_order_data.all_handles``, set at FSDP1's lazy init), which is how it
    is found. FSDP1 is frozen upstream, so these private names are stable.
    """
    from torch.distributed.fsdp._flat_param import HandleTrainingState

    handles: dict[int, object] = {}
    for unit in _units(model):
        found = [unit._handle, *getattr(getattr(unit, "_exec_order_data", None), "all_handles", [])]
        handles.update((id(h), h) for h in found if h is not None)
    return [
        h for h in handles.values()
        if h.uses_sharded_strategy and h._training_state == HandleTrainingState.IDLE
        and getattr(h.flat_param, "_full_param_padded", None) is not None and not h.needs_unshard()
    ]


def _units(model: nn.Module) -> list[Any]:
    """The FSDP1 units that manage ``model``'s parameters: those inside it, or else the one unit
    that wraps it from outside (``FSDP(model, ...)`` without inner units)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    inside = [unit for unit in model.modules() if isinstance(unit, FullyShardedDataParallel)]
    if inside:
        return inside
    outer = _OUTER_UNITS.get(model)
    unit = outer() if outer is not None else None
    if unit is None or unit.module is not model:
        unit = _find_outer_unit(model, FullyShardedDataParallel)
        if unit is None:
            return []
        _OUTER_UNITS[model] = weakref.ref(unit)
    return [unit]


_OUTER_UNITS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
"""``model`` -> the FSDP1 unit found wrapping it from outside (one search per model)."""


def _find_outer_unit(model: nn.Module, unit_class: type) -> Any:
    """The FSDP1 unit whose wrapped module is ``model``.

    A module does not know what wraps it, and an FSDP1 unit around a model with no unit inside it
    is the only place its handle (sharding strategy, process group, gathered copy) can be read:
    without it a ``NO_SHARD`` model would be gathered over the world and a merge after a forward
    would write into a copy FSDP1 then drops. So the collector's objects are searched once per model
    (a fraction of a second; cached), only when no unit is inside the model.
    """
    for obj in gc.get_objects():
        if isinstance(obj, unit_class) and obj.module is model:
            return obj
    return None


def _wrap_fsdp1(model: nn.Module, device: torch.device) -> nn.Module:
    """``FullyShardedDataParallel`` with ``use_orig_params=True`` (needed to mix frozen and
    trainable parameters in one unit), one unit per repeated block."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    _check_one_dtype(model)
    block_types = {type(b) for b in repeated_blocks(model)}
    return FullyShardedDataParallel(
        model, use_orig_params=True, device_id=device,
        auto_wrap_policy=ModuleWrapPolicy(block_types) if block_types else None,
        param_init_fn=(lambda m: _materialise_unit(m, device)) if on_meta(model) else None,
    )


def _check_one_dtype(model: nn.Module) -> None:
    """FSDP1 flattens each unit's parameters into one tensor, so they must share one dtype."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    if len(dtypes) > 1:
        raise ConfigError(
            f"FSDP1 needs one parameter dtype per unit, but this model mixes {' and '.join(dtypes)} "
            "(delta_dtype='auto' keeps deltas in float32 on a half-precision backbone). Use fsdp2, "
            "which keeps trainable parameters apart; or keep the backbone in float32 and let "
            "MixedPrecision(param_dtype=torch.bfloat16) compute in half precision; or build the "
            "delta with delta_dtype='site'."
        )


def _materialise_unit(module: nn.Module, device: torch.device) -> None:
    """FSDP1's ``param_init_fn``: real storage for one module, and its shapes noted for the engine.

    ``to_empty`` makes new parameter objects, so the shapes noted on the meta ones are lost.
    """
    module.to_empty(device=device, recurse=False)
    record_logical_shapes(module, Engine(), recurse=False)
