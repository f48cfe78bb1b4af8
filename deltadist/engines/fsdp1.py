"""FSDP1 (``FullyShardedDataParallel(..., use_orig_params=True)``): flat sharded views.

With ``use_orig_params=True`` every original parameter stays the same ``nn.Parameter`` object, but
outside forward its data is this rank's piece of it: a 1-D view (possibly empty) of the unit's
flat shard. Laid end to end in rank order the pieces are the flattened parameter, so a delta is
gathered by collecting the pieces and reshaping to its logical shape, which deltadist records
before wrapping (FSDP1 keeps no trace of it on the parameter). FSDP1 marks the parameters it manages
with ``_fsdp_flattened``; that is how this engine recognises them.
"""

from __future__ import annotations

import torch
from torch import nn

from deltadist.engines.base import recorded_shape
from deltadist.engines.distributed import (
    DistributedEngine,
    all_gather_pieces,
    distributed_ready,
    piece_offsets,
    sample_from_pieces,
)
from deltadist.errors import EngineError

FSDP1_FLAG = "_fsdp_flattened"


def is_flat_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, FSDP1_FLAG, False))


class FSDP1Engine(DistributedEngine):
    """Engine for models wrapped in FSDP1 with ``use_orig_params=True``."""

    name = "fsdp1"
    # FSDP1's own state-dict hook on the root unit, which wraps the backbone from outside and so
    # runs after deltadist's, requires every parameter it manages to be in the dict.
    trainable_only_state_dict = False

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        return distributed_ready() and any(is_flat_sharded(p) for p in model.parameters())

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
        if not is_flat_sharded(param):
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
        if not is_flat_sharded(param):
            return param
        pieces = all_gather_pieces(param.detach().reshape(-1))
        return torch.cat(pieces).reshape(self.logical_shape(param))

    def scatter(self, param: torch.Tensor, value: torch.Tensor) -> None:
        if not is_flat_sharded(param):
            return super().scatter(param, value)
        start = piece_offsets(param.numel())[self.rank]
        piece = value.reshape(-1)[start:start + param.numel()]
        with torch.no_grad():
            param.view(-1).copy_(piece.to(device=param.device, dtype=param.dtype))

    def sample(self, param: torch.Tensor, flat_indices: torch.Tensor) -> torch.Tensor | None:
        if not is_flat_sharded(param):
            return super().sample(param, flat_indices)
        return sample_from_pieces(param, piece_offsets(param.numel())[self.rank], flat_indices)


def _handles_holding_a_gathered_copy(model: nn.Module) -> list:
    """FSDP1 handles (flat parameters) of ``model``'s units that sit idle with a gathered copy.

    The root unit usually wraps ``model`` from outside; every unit inside shares the root's list
    of all handles (``_exec_order_data.all_handles``, set at FSDP1's lazy init), which is how it
    is found. FSDP1 is frozen upstream, so these private names are stable.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._flat_param import HandleTrainingState

    handles: dict[int, object] = {}
    for unit in model.modules():
        if not isinstance(unit, FullyShardedDataParallel):
            continue
        found = [unit._handle, *getattr(getattr(unit, "_exec_order_data", None), "all_handles", [])]
        handles.update((id(h), h) for h in found if h is not None)
    return [
        h for h in handles.values()
        if h.uses_sharded_strategy and h._training_state == HandleTrainingState.IDLE
        and getattr(h.flat_param, "_full_param_padded", None) is not None and not h.needs_unshard()
    ]
