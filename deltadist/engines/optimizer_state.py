"""An optimizer's state as pieces on each rank, and back: what a resumable checkpoint stores.

Under FSDP2 the optimizer's moments are DTensors sharded like their parameters; a checkpoint
keeps each rank's local piece, and loading wraps the pieces again with the live parameter's mesh
and placements. Everywhere else (one process, DDP, FSDP1's flat shards, BMTrain's pieces) the
state already is a plain tensor of this rank.
"""

from __future__ import annotations

from typing import Any

import torch


def local_piece(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (a DTensor's local shard; a plain tensor itself)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def rewrap_pieces(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (a torch optimizer state dict of local pieces) with each piece shaped like its
    parameter's local shard turned back into a DTensor like that parameter, ready for
    ``optimizer.load_state_dict``. Scalars such as Adam's ``step`` stay as they are."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    rewrapped = {}
    for index, values in state["state"].items():
        param = params[index]
        if isinstance(param, DTensor):
            shard = param.to_local().shape
            values = {name: DTensor.from_local(value.to(param.device), param.device_mesh, param.placements,
                                               shape=param.shape, stride=param.stride())
                      if isinstance(value, torch.Tensor) and value.dim() and value.shape == shard else value
                      for name, value in values.items()}
        rewrapped[index] = values
    return {**state, "state": rewrapped}
