"""BMTrain: ZeRO-3 ``DistributedParameter`` s, in or out of a ``bmt.Block``.

A ``DistributedParameter`` keeps its logical shape in ``_original_shape`` and, as its data, this
rank's piece of the flattened values: elements ``[_start_partition, _start_partition + numel)``
(a parameter inside a ``Block`` is a view of the block's storage, possibly empty, and
``_start_partition`` is ``None`` then). Outside a block a parameter is gathered whenever a
``DistributedModule`` reads it as an attribute (a differentiable all-gather whose backward
reduce-scatters the gradient), which is how new delta parameters join a model BMTrain already
manages: :meth:`BMTrainEngine.adopt` turns each one into a ``DistributedParameter`` (values
broadcast from rank 0 first, so every rank keeps a piece of the same tensor) and gives its module
``DistributedModule``'s attribute access, as ``bmt.BMTrainModelWrapper`` does for whole models.

A delta is gathered by placing every rank's piece at its offset in a zero tensor and summing over
the parameter's communicator, so only the named tensors travel, never the backbone. BMTrain runs
its collectives on NCCL and does not start a ``torch.distributed`` group; ``bmtrain`` is imported
only when one of its parameters is seen. Tensor parallelism (``tp_size > 1``) is refused.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from deltadist.engines.base import Engine
from deltadist.engines.runtime import EngineSetup
from deltadist.errors import CheckpointError, EngineError

_MIXED_CLASSES: dict[type, type] = {}
"""A module class -> its subclass with ``DistributedModule``'s gathering attribute access."""


def is_distributed(param: torch.Tensor) -> bool:
    """Whether ``param`` is a BMTrain ``DistributedParameter`` (without importing bmtrain)."""
    bmtrain = sys.modules.get("bmtrain")
    return bmtrain is not None and isinstance(param, bmtrain.DistributedParameter)


def piece_start(param: torch.Tensor) -> int:
    """Flat offset of this rank's piece of ``param`` in its logical tensor (0 for an empty piece)."""
    return param._start_partition or 0


def place_piece(param: torch.Tensor) -> torch.Tensor:
    """The logical tensor, flattened, with zeros everywhere but this rank's piece. Summed over the
    ranks of ``param``'s communicator these give the whole tensor. Shape: ``(numel,)``."""
    piece = param.detach().reshape(-1)
    full = torch.zeros(param._original_shape.numel(), dtype=param.dtype, device=param.device)
    start = piece_start(param)
    full[start:start + piece.numel()] = piece
    return full


def own_piece(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """This rank's piece of the full tensor ``value`` (shape: ``param``'s local data)."""
    start = piece_start(param)
    return value.reshape(-1)[start:start + param.numel()]


class BMTrainEngine(Engine):
    """Engine for models whose parameters are BMTrain ``DistributedParameter`` s."""

    name = "bmtrain"
    quantized_weights_problem = "BMTrain keeps its parameters in its own flat buffers"
    half_precision_problem = "BMTrain's half-precision mode is not wired to deltadist train yet"
    launcher_script = "bmtrain.sh"
    accumulates = False
    forwards_together = True
    generation_problem = "generating under BMTrain is not wired to deltadist train yet"

    @classmethod
    def launch(cls, environ: Mapping[str, str] | None = None, **options: Any) -> EngineSetup:
        """BMTrain's own NCCL world (no torch.distributed group; CUDA only)."""
        from deltadist.engines.bmtrain_runtime import launch_bmtrain

        return launch_bmtrain(cls.name, os.environ if environ is None else environ)

    @classmethod
    def wrap(cls, model: nn.Module, device: torch.device) -> nn.Module:
        from deltadist.engines.bmtrain_runtime import wrap_for_bmtrain

        return wrap_for_bmtrain(model, device)

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        return "bmtrain" in sys.modules and any(is_distributed(p) for p in model.parameters())

    @classmethod
    def for_model(cls, model: nn.Module) -> "BMTrainEngine":
        if any(getattr(p, "_tp_mode", False) for p in model.parameters() if is_distributed(p)):
            raise EngineError(
                "This BMTrain model uses tensor parallelism (tp_size > 1), which deltadist does not "
                "support yet: a delta's logical shape and gather would have to follow the tensor "
                "split. Initialise BMTrain with tp_size=1 (bmt.init_distributed(tp_size=1))."
            )
        return cls()

    def model_class_name(self, model: nn.Module) -> str:
        # BMTrainModelWrapper (and adopt) swap the class for "bmtrain.Distributed<Name>".
        return next(c.__name__ for c in type(model).__mro__
                    if not c.__name__.startswith("bmtrain.Distributed"))

    # -- the parallel world: BMTrain's NCCL communicators -------------------------------------
    @property
    def rank(self) -> int:
        return _bmtrain().rank()

    @property
    def world_size(self) -> int:
        return _bmtrain().world_size()

    def barrier(self) -> None:
        if self.world_size > 1:
            _bmtrain().synchronize()

    def broadcast_outcome(self, error: Exception | None, what: str) -> None:
        outcome = None if error is None else f"{type(error).__name__}: {error}"
        if self.world_size > 1:
            from bmtrain.global_var import config
            from bmtrain.store import broadcast_object

            outcome = broadcast_object(outcome, config["comm"], 0)
        if error is not None:
            raise error
        if outcome is not None:
            raise CheckpointError(f"Rank 0 failed while {what}: {outcome}")

    # -- tensors ------------------------------------------------------------------------------
    def logical_shape(self, param: torch.Tensor) -> torch.Size:
        return torch.Size(param._original_shape) if is_distributed(param) else param.shape

    def _full_tensor(self, param: torch.Tensor) -> torch.Tensor:
        if not is_distributed(param):
            return param
        return self._sum(place_piece(param), param).view(param._original_shape)

    def scatter(self, param: torch.Tensor, value: torch.Tensor) -> None:
        if not is_distributed(param):
            return super().scatter(param, value)
        with torch.no_grad():
            param.data.copy_(own_piece(param, value.to(device=param.device, dtype=param.dtype)))

    def sample(self, param: torch.Tensor, flat_indices: torch.Tensor) -> torch.Tensor | None:
        if not is_distributed(param):
            return super().sample(param, flat_indices)
        start, piece = piece_start(param), param.detach().reshape(-1)
        mine = (flat_indices >= start) & (flat_indices < start + piece.numel())
        values = torch.zeros(len(flat_indices), dtype=torch.float64, device=param.device)
        values[mine.to(param.device)] = piece[(flat_indices[mine] - start).to(param.device)].double()
        return self._sum(values, param).cpu()

    def _sum(self, tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of ``tensor`` over the ranks that share ``param``'s pieces."""
        if self.world_size == 1:
            return tensor
        from bmtrain.distributed import all_reduce

        return all_reduce(tensor, "sum", param._zero_comm)

    # -- new parameters -----------------------------------------------------------------------
    def adopt(self, modules: Iterable[nn.Module]) -> None:
        """Make the parameters of new delta ``modules`` BMTrain's, sharded like the backbone's.

        Each parameter becomes a ``DistributedParameter`` holding this rank's piece of rank 0's
        values, and each module that owns one reads it gathered, like a ``DistributedModule``.
        Parameters that already are distributed (a re-attach) are left alone.
        """
        for module in modules:
            for owner in module.modules():
                fresh = [k for k, p in owner._parameters.items() if p is not None and not is_distributed(p)]
                for key in fresh:
                    owner._parameters[key] = distribute(owner._parameters[key])
                if any(is_distributed(p) for p in owner._parameters.values()):
                    owner.__class__ = gathering_class(type(owner))


def _bmtrain() -> Any:
    import bmtrain

    return bmtrain


def distribute(param: nn.Parameter) -> nn.Parameter:
    """A ``DistributedParameter`` with rank 0's values of ``param`` (its flags kept)."""
    bmt = _bmtrain()
    data = param.detach().to(device="cuda", memory_format=torch.contiguous_format)
    if bmt.world_size() > 1:
        data = bmt.distributed.broadcast(data, 0)
    return bmt.DistributedParameter(data, requires_grad=param.requires_grad)


def gathering_class(cls: type) -> type:
    """``cls`` with ``DistributedModule``'s attribute access (gathers distributed parameters)."""
    distributed_module = _bmtrain().DistributedModule
    if issubclass(cls, distributed_module):
        return cls
    if cls not in _MIXED_CLASSES:
        # The name BMTrainModelWrapper gives its converted classes, so model_class_name finds the
        # user's class the same way for both.
        _MIXED_CLASSES[cls] = type(f"bmtrain.Distributed{cls.__name__}", (cls, distributed_module), {})
    return _MIXED_CLASSES[cls]
