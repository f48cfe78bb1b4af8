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

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        return distributed_ready() and any(is_flat_sharded(p) for p in model.parameters())

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
