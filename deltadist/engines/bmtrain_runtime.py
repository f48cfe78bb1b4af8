"""``engine: bmtrain`` for the training job: BMTrain's start, wrapping and optimizer step.

BMTrain needs CUDA (its collectives are NCCL's) and starts no ``torch.distributed`` group: it
reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` itself, so it
is started by torchrun (``launchers/bmtrain.sh``). The delta-fitted model is converted by
``bmt.BMTrainModelWrapper``: every parameter, the deltas' included, becomes a
``DistributedParameter`` and every block of a ``ModuleList`` a ``bmt.Block`` (ZeRO-3 with
activation checkpointing).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from deltadist.engines.runtime import EngineSetup, export_launch_variables, launch_info, rendezvous
from deltadist.errors import ConfigError


def import_bmtrain() -> Any:
    """``bmtrain``, or a :class:`ConfigError` saying how to get it and that it needs CUDA."""
    if not torch.cuda.is_available():
        raise ConfigError(
            "engine: bmtrain needs CUDA GPUs (BMTrain's collectives run on NCCL); this machine has "
            "none. Use engine ddp, fsdp2, fsdp1 or deepspeed here (launchers/torchrun.sh)."
        )
    try:
        import bmtrain
    except ImportError as err:
        raise ConfigError("engine: bmtrain needs BMTrain built for this torch and CUDA: "
                          "pip install bmtrain (see docs/engines.md, 'BMTrain').") from err
    return bmtrain


def start_bmtrain(seed: int) -> tuple[int, int, int]:
    """``bmt.init_distributed`` (once per process); returns ``(rank, world size, local rank)``."""
    bmt = import_bmtrain()
    from bmtrain.global_var import config

    if not config["initialized"]:
        bmt.init_distributed(seed=seed)
    return bmt.rank(), bmt.world_size(), config["local_rank"]


def wrap_for_bmtrain(model: nn.Module, device: torch.device) -> nn.Module:
    """Convert ``model`` (deltas attached, frozen, real weights) in place with BMTrain's wrapper."""
    if any(p.is_meta for p in model.parameters()):
        raise ConfigError("engine: bmtrain needs real weights: BMTrain partitions each parameter "
                          "from its values. Load the backbone before wrapping.")
    bmt = import_bmtrain()
    return bmt.BMTrainModelWrapper(model.to(device))


def bmtrain_barrier() -> None:
    """Wait for every rank of BMTrain's world."""
    import_bmtrain().synchronize()


def sum_over_bmtrain_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over BMTrain's ranks (its own NCCL communicator)."""
    return import_bmtrain().distributed.all_reduce(tensor.detach().clone(), "sum")


def clip_bmtrain_grad_norm(runner: nn.Module, parameters: list[nn.Parameter],
                           max_norm: float) -> torch.Tensor:
    """Clip the global norm of the gradients' pieces (summed over ranks by BMTrain)."""
    return import_bmtrain().optim.clip_grad_norm([{"params": parameters}], max_norm)


class BMTrainStepper:
    """The loop's optimizer under BMTrain: waits for BMTrain's gradient reductions, then averages.

    BMTrain reduce-scatters gradients as sums over the ranks on its own CUDA stream (its
    ``OptimManager`` divides the loss by the world size instead); the job's loss is scaled for
    averaging, as DDP and FSDP do, so the summed gradients are divided by the world size here.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, world_size: int) -> None:
        self.optimizer = optimizer
        self.world_size = world_size

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        from bmtrain.global_var import config

        torch.cuda.current_stream().wait_stream(config["load_stream"])
        with torch.no_grad():
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        param.grad.div_(self.world_size)
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        """This rank's optimizer state (over its pieces of the delta)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


def launch_bmtrain(name: str, environ: Mapping[str, str]) -> EngineSetup:
    """BMTrain's own NCCL world (no torch.distributed group): it reads the launcher's variables
    from ``os.environ``, so those of SLURM or MPI are exported there first."""
    info = launch_info(environ)
    if info is not None and info.source != "torchrun":
        meeting = rendezvous(info, environ)
        if meeting is not None:
            export_launch_variables(info, meeting)
    rank, world_size, local_rank = start_bmtrain(seed=0)
    device = torch.device("cuda", local_rank)

    def prepare(model: nn.Module, optimizer: Any) -> tuple[nn.Module, Any]:
        return model, BMTrainStepper(optimizer, world_size)

    return EngineSetup(name=name, device=device, wrap=lambda model: wrap_for_bmtrain(model, device),
                       rank=rank, world_size=world_size, prepare=prepare,
                       barrier=bmtrain_barrier, sum_over_ranks=sum_over_bmtrain_ranks,
                       clip_grad_norm=clip_bmtrain_grad_norm, accumulates=False)
