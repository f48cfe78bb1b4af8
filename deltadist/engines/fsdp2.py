"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are ``DTensor`` s.

Logical shapes are the DTensors' global shapes; a delta is gathered with ``full_tensor()`` (only
the deltas, one at a time), and values are scattered with ``distribute_tensor``. Fingerprint
samples of backbone parameters sharded on dim 0 are read from the local shards and summed across
the ranks that share them, so the backbone is never gathered.

Rows are located on the parameter's own device mesh, never the world: the mesh may be a 1-D
sub-mesh (a group smaller than the world) or 2-D under HSDP (``(Replicate(), Shard(0))``: shards
within a replica, replicas side by side), and only the shard dimension's group splits the rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from deltadist.engines.base import TensorSource
from deltadist.engines.distributed import DistributedEngine, distributed_ready, sample_from_pieces
from deltadist.engines.storage import is_quantized_tensor, unknown_samples
from deltadist.engines.wrapping import repeated_blocks
from deltadist.errors import EngineError


class FSDP2Engine(DistributedEngine):
    """Engine for models sharded with ``fully_shard``."""

    name = "fsdp2"
    shards_parameters = True
    forwards_together = True

    @classmethod
    def wrap(cls, model: nn.Module, device: torch.device) -> nn.Module:
        """``fully_shard`` every repeated block, then the root (in place: returns ``model``).
        Parameters still on ``meta`` get storage on ``device``; values are loaded afterwards."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in repeated_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

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

    def stored(self, param: torch.Tensor) -> torch.Tensor:
        return param.to_local() if isinstance(param, DTensor) else param

    def place(self, param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if not isinstance(param, DTensor):
            return super().place(param, value)
        rows = _row_shard(param)
        local = param.to_local()
        if rows is None:
            raise EngineError(f"cannot place a {type(value).__name__} in a parameter sharded as "
                              f"{param.placements}; only row shards (FSDP2's Shard(0)) hold one.")
        # This rank's rows split off locally, not distribute_tensor: a quantized tensor has no
        # collectives of its own, and torchao's NF4 splits (along whole blocks) but does not slice.
        start, count = rows[0], local.shape[0]
        # A quantized tensor splits along whole blocks (NF4: scaler_block_size blocks of block_size).
        block = getattr(value, "block_size", 1) * getattr(value, "scaler_block_size", 1)
        if count == 0 or start % count or param.shape[0] % count or count * param.shape[1:].numel() % block:
            raise EngineError(f"a {type(value).__name__} of {param.shape[0]} rows cannot be sharded in "
                              f"pieces of {count} rows ({block} values per block): choose a world size "
                              "that splits it into whole blocks.")
        piece = value.split(count, dim=0)[start // count].to(local.device)
        return DTensor.from_local(piece, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())

    def scatter(self, param: torch.Tensor, value: torch.Tensor) -> None:
        if not isinstance(param, DTensor):
            return super().scatter(param, value)
        local = param.to_local()
        value = value.to(device=local.device, dtype=local.dtype)
        shard = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
        with torch.no_grad():
            local.copy_(shard.to_local())

    def load(self, param: torch.Tensor, source: TensorSource) -> None:
        rows = _row_shard(param) if isinstance(param, DTensor) else None
        if rows is None:
            return super().load(param, source)
        start, _ = rows
        local = param.to_local()
        with torch.no_grad():
            local.copy_(source.rows(start, start + local.shape[0]).to(local.device, local.dtype))

    def sample(self, param: torch.Tensor, flat_indices: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(param, DTensor):
            return super().sample(param, flat_indices)
        if param.device.type == "meta" or param.to_local().device.type == "meta":
            return None
        if is_quantized_tensor(param.to_local()):
            return unknown_samples(flat_indices)
        if all(isinstance(p, Replicate) for p in param.placements):
            return super().sample(param.to_local(), flat_indices)
        rows = _row_shard(param)
        if rows is None:
            # Unusual layouts: gathering one backbone tensor is still bounded by its size.
            return super().sample(param.full_tensor(), flat_indices)
        # This rank's rows are a contiguous flat piece; the other pieces of the same replica are
        # on the shard dimension's group, so the sum runs there (summing over replicas as well
        # would count every value once per replica).
        start, group = rows
        local = param.to_local()
        return sample_from_pieces(local, start * param.shape[1:].numel(), flat_indices, group)


def _row_shard(param: DTensor) -> tuple[int, dist.ProcessGroup] | None:
    """The first row this rank holds of ``param`` and the group holding the other rows, if
    ``param`` is split on dim 0 along exactly one mesh dimension and replicated along any other
    (FSDP2: ``(Shard(0),)``, or ``(Replicate(), Shard(0))`` under HSDP); else ``None``."""
    placements = tuple(param.placements)
    split = [i for i, p in enumerate(placements) if p == Shard(0)]
    others = [p for i, p in enumerate(placements) if i not in split]
    if len(split) != 1 or not all(isinstance(p, Replicate) for p in others):
        return None
    mesh, dim = param.device_mesh, split[0]
    # fully_shard splits rows like torch.chunk over that dimension's ranks: piece i starts at
    # i * ceil(n / pieces) (pieces past the end are empty).
    rows = param.shape[0]
    start = mesh.get_local_rank(dim) * -(-rows // mesh.size(dim))
    return min(start, rows), mesh.get_group(dim)
