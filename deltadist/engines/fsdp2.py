"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are ``DTensor`` s.

Logical shapes are the DTensors' global shapes; a delta is gathered with ``full_tensor()`` (only
the deltas, one at a time), and values are scattered with ``distribute_tensor``. Fingerprint
samples of backbone parameters sharded on dim 0 are read from the local shards and summed across
ranks, so the backbone is never gathered.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from deltadist.engines.base import TensorSource
from deltadist.engines.distributed import (
    DistributedEngine, distributed_ready, piece_offsets, sample_from_pieces,
)
from deltadist.errors import EngineError


class FSDP2Engine(DistributedEngine):
    """Engine for models sharded with ``fully_shard``."""

    name = "fsdp2"

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        return distributed_ready() and any(isinstance(m, FSDPModule) for m in model.modules())

    def settle(self, model: nn.Module) -> None:
        # After a forward FSDP2 leaves the root unit unsharded (reshard_after_forward is False
        # there): its parameters are then plain tensors that an optimizer or a load would write
        # to in vain. Resharding restores the DTensor parameters, which are the real ones.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def model_class_name(self, model: nn.Module) -> str:
        # fully_shard swaps the class for a dynamic subclass named "FSDP<Name>".
        return next(c.__name__ for c in type(model).__mro__[1:] if not issubclass(c, FSDPModule)) \
            if isinstance(model, FSDPModule) else type(model).__name__

    def check_attachable(self, model: nn.Module) -> None:
        raise EngineError(
            "fully_shard has already sharded this model, so new delta parameters would not be "
            "sharded or gradient-reduced. Attach deltas before fully_shard (or use "
            "deltadist.prepare_model, which does it in the right order)."
        )

    def _full_tensor(self, param: torch.Tensor) -> torch.Tensor:
        return param.full_tensor() if isinstance(param, DTensor) else param

    def scatter(self, param: torch.Tensor, value: torch.Tensor) -> None:
        if not isinstance(param, DTensor):
            return super().scatter(param, value)
        local = param.to_local()
        value = value.to(device=local.device, dtype=local.dtype)
        shard = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
        with torch.no_grad():
            local.copy_(shard.to_local())

    def load(self, param: torch.Tensor, source: TensorSource) -> None:
        if not isinstance(param, DTensor) or tuple(param.placements) != (Shard(0),):
            return super().load(param, source)
        # fully_shard splits dim 0 like torch.chunk: rank r holds rows from r * ceil(n / world).
        local = param.to_local()
        start = self.rank * -(-param.shape[0] // self.world_size)
        with torch.no_grad():
            local.copy_(source.rows(start, start + local.shape[0]).to(local.device, local.dtype))

    def sample(self, param: torch.Tensor, flat_indices: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(param, DTensor):
            return super().sample(param, flat_indices)
        if param.device.type == "meta" or param.to_local().device.type == "meta":
            return None
        placements = tuple(param.placements)
        if all(isinstance(p, Replicate) for p in placements):
            return super().sample(param.to_local(), flat_indices)
        if placements != (Shard(0),):
            # Unusual layouts: gathering one backbone tensor is still bounded by its size.
            return super().sample(param.full_tensor(), flat_indices)
        # Shard(0): rank r holds a contiguous run of rows, i.e. a contiguous flat piece.
        local = param.to_local()
        first_row = piece_offsets(local.shape[0])[self.rank]
        return sample_from_pieces(local, first_row * param.shape[1:].numel(), flat_indices)
