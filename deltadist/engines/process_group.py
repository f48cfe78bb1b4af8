"""Starting (or joining) the default ``torch.distributed`` process group for a job's ranks.

One process per rank, started by ``torchrun`` (``launchers/torchrun.sh``), SLURM's ``srun`` or
``mpirun``: NCCL on ``cuda:LOCAL_RANK`` when CUDA is available, else gloo on the CPU. Started
without a launcher, a distributed engine runs as a world of one (an in-process store, no port),
which is handy for trying a config. A group someone else started is joined, not owned.
"""

from __future__ import annotations

import sys
import warnings
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from deltadist.engines.runtime import (
    EngineSetup,
    LaunchInfo,
    export_launch_variables,
    launch_info,
    rendezvous,
)
from deltadist.errors import ConfigError


def start_process_group(name: str, wrap: Callable[[nn.Module, torch.device], nn.Module],
                        environ: Mapping[str, str], launcher_script: str) -> EngineSetup:
    """The :class:`EngineSetup` of engine ``name`` on the default process group, initialised here
    unless one is up already; ``wrap(model, device)`` is the engine's wrapping, ``launcher_script``
    the script in ``launchers/`` that starts its ranks (named when a job runs without one)."""
    info = launch_info(environ)
    owned = not dist.is_initialized()
    meeting = None
    if owned and info is not None and info.source != "torchrun":
        meeting = rendezvous(info, environ)  # checked before anything starts
    device = _rank_device(info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if owned:
        _init_group(name, info, meeting, device, launcher_script)

    def close() -> None:
        if owned and dist.is_initialized():
            dist.destroy_process_group()

    if info is not None and dist.get_world_size() != info.world_size:
        close()
        raise ConfigError(f"{info.launcher.world_size}={info.world_size} (from {info.launcher.title}) "
                          f"but the process group has {dist.get_world_size()} ranks.")

    def wrap_quietly(model: nn.Module) -> nn.Module:
        with warnings.catch_warnings():
            # FSDP1 warns once per unit that mixes frozen and trainable parameters (every
            # LoRA'd layer, on every rank): the expected cost of one unit per block.
            warnings.filterwarnings("ignore", message=".*has both parameters with requires_grad")
            return wrap(model, device)

    def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.detach().to(device, copy=True)
        dist.all_reduce(total)
        return total

    return EngineSetup(
        name=name, device=device, wrap=wrap_quietly,
        rank=dist.get_rank(), world_size=dist.get_world_size(), close=close,
        barrier=dist.barrier, sum_over_ranks=sum_over_ranks,
    )


def _rank_device(info: LaunchInfo | None) -> torch.device:
    """This rank's device: ``cuda:<local rank>`` when CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if info is not None:
        local_rank = info.local_rank
        if info.source != "torchrun" and torch.cuda.device_count() == 1:
            local_rank = 0  # srun / mpirun bound one GPU to each rank
    elif dist.is_initialized():  # a group someone else started: one GPU per rank
        local_rank = dist.get_rank() % torch.cuda.device_count()
    else:
        local_rank = 0
    return torch.device("cuda", local_rank)


def _init_group(name: str, info: LaunchInfo | None, meeting: tuple[str, int] | None,
                device: torch.device, launcher_script: str) -> None:
    """Initialise the default group: torchrun's ``env://``, another launcher's variables exported
    first, or a world of one on an in-process store."""
    cuda = device.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if info is not None and info.source != "torchrun" and meeting is None:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    elif info is not None and info.source != "torchrun":
        export_launch_variables(info, meeting)
        dist.init_process_group(backend, device_id=device if cuda else None, rank=info.rank,
                                world_size=info.world_size)
    elif info is not None:
        dist.init_process_group(backend, device_id=device if cuda else None)
    else:
        print(f"deltadist: engine {name} started without a launcher: running as a world of "
              f"1. Use deltadist launch {launcher_script.partition('.')[0]} --nproc N for N ranks.",
              file=sys.stderr)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
