"""How a job's ranks were launched, and what an engine's launch gives the training loop.

Each engine's own ``launch`` (:meth:`deltadist.engines.Engine.launch`) builds an
:class:`EngineSetup` from what this module reads; :func:`deltadist.engines.setup_engine` picks the
engine by name.

``plain``: one process, one GPU when CUDA is available, else the CPU. ``ddp``, ``fsdp2``, ``fsdp1``:
one process per rank, started by ``torchrun`` (``launchers/torchrun.sh``); the default process
group is initialised here (NCCL on ``cuda:LOCAL_RANK`` when CUDA is available, else gloo on the
CPU), the delta-fitted model is wrapped by its engine's ``wrap``, and
:meth:`EngineSetup.close` destroys the group at the end. Started without a launcher, a distributed
engine runs as a world of one (an in-process store, no port), which is handy for trying a config.

The ranks may also be started by SLURM's ``srun`` or by ``mpirun`` (Open MPI, MPICH, Intel MPI):
:func:`launch_info` reads each one's variables (torchrun's first), and the group then meets at
``MASTER_ADDR:MASTER_PORT``, which the job script sets. ``bmtrain`` (CUDA only) starts BMTrain's
own NCCL world instead of a process group (``deltadist/engines/bmtrain_runtime.py``).

The training loop sees only an :class:`EngineSetup` (device, wrap, rank, world size, close).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Mapping

import torch
from torch import nn

from deltadist.errors import ConfigError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""Set in every rank by ``torchrun`` (and the DeepSpeed launcher, ``accelerate launch``)."""

RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT")
"""Where the ranks meet (``env://``): torchrun sets them; after srun or mpirun the job script does."""


@dataclass(frozen=True)
class LaunchSource:
    """A program that starts the ranks, and the variables in which it tells each one its place."""

    name: str
    """``LaunchInfo.source``: ``torchrun``, ``openmpi``, ``mpich`` or ``slurm``."""
    title: str
    """How messages name it."""
    marker: str
    """Set in every process it starts (and unlikely elsewhere): its presence selects this source."""
    rank: str
    world_size: str
    local_rank: tuple[str, ...]
    """The local rank is read from the first of these that is set."""
    fix: str
    """How to give the ranks ``MASTER_ADDR`` and ``MASTER_PORT`` (not needed after torchrun)."""

    @property
    def variables(self) -> tuple[str, ...]:
        """Every variable this source sets for a rank."""
        return (self.rank, self.world_size, *self.local_rank)


LAUNCH_SOURCES: tuple[LaunchSource, ...] = (
    LaunchSource(
        "torchrun", "torchrun or the DeepSpeed launcher", "WORLD_SIZE", "RANK", "WORLD_SIZE",
        ("LOCAL_RANK",), "torchrun sets both"),
    LaunchSource(
        "openmpi", "Open MPI's mpirun", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",),
        "e.g. mpirun -x MASTER_ADDR=<first host> -x MASTER_PORT=29500 ..."),
    LaunchSource(
        "mpich", "MPICH / Intel MPI (PMI)", "PMI_SIZE", "PMI_RANK", "PMI_SIZE",
        ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"),
        "e.g. mpiexec -genv MASTER_ADDR <first host> -genv MASTER_PORT 29500 ..."),
    LaunchSource(
        # SLURM_STEP_ID: srun sets it in each task; a batch script has SLURM_PROCID=0 and the job's
        # SLURM_NTASKS without being one of the tasks, and must not read as rank 0 of them.
        "slurm", "SLURM's srun", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS", ("SLURM_LOCALID",),
        'e.g. in the sbatch script, before srun: export MASTER_ADDR=$(scontrol show hostnames '
        '"$SLURM_JOB_NODELIST" | head -n 1) MASTER_PORT=29500; or start the job with '
        "deltadist launch slurm"),
)
"""In order of precedence: torchrun started inside an sbatch or MPI job also sees their variables
(and MPI started by srun sees SLURM's), and the innermost launcher is the one that placed the rank."""

def _nothing() -> None:
    return None


def _as_is(runner: nn.Module, optimizer: Any) -> tuple[nn.Module, Any]:
    return runner, optimizer


def _alone(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def _syncing(runner: nn.Module, sync: bool) -> Iterator[None]:
    """Gradient reduction on (``sync``) or deferred for an accumulating backward: DDP and FSDP1
    skip it in ``no_sync()``, FSDP2 with ``set_requires_gradient_sync(False)``; one process
    has nothing to reduce. The gradients are the same either way, only the traffic differs."""
    if sync:
        yield
    elif hasattr(runner, "set_requires_gradient_sync"):  # FSDP2
        runner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            runner.set_requires_gradient_sync(True)
    elif hasattr(runner, "no_sync"):  # DDP, FSDP1
        with runner.no_sync():
            yield
    else:
        yield


def _backward(loss: torch.Tensor, stepper: Any) -> None:
    loss.backward()


def _clip(runner: nn.Module, parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm: FSDP1 computes it over its flat shards itself; for
    FSDP2's DTensor gradients and everything else torch's function sums the norms over the mesh."""
    if hasattr(runner, "clip_grad_norm_") and not hasattr(runner, "set_requires_gradient_sync"):
        return runner.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


@dataclass(frozen=True)
class EngineSetup:
    """The device to train on, the hook that wraps the delta-fitted model, and this rank's place."""

    name: str
    device: torch.device
    wrap: Callable[[nn.Module], nn.Module]
    rank: int = 0
    world_size: int = 1
    close: Callable[[], None] = field(default=_nothing)
    """Tear down what setup started (the process group it initialised); call once, at the end."""
    prepare: Callable[[nn.Module, Any], tuple[nn.Module, Any]] = field(default=_as_is)
    """``(wrapped model, optimizer) -> (runner, stepper)``, once, after ``wrap`` and the optimizer:
    the identity except under DeepSpeed, whose ``deepspeed.initialize`` takes both together."""
    barrier: Callable[[], None] = field(default=_nothing)
    """Wait until every rank gets here."""
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] = field(default=_alone)
    """A tensor of this rank -> the sum of every rank's (a new tensor, the same on every rank)."""
    gradient_sync: Callable[[nn.Module, bool], ContextManager[None]] = field(default=_syncing)
    """``with gradient_sync(runner, sync)`` around a backward: ``sync=False`` for all but the last
    of an accumulating step, where the engine can skip reducing gradients."""
    clip_grad_norm: Callable[[nn.Module, list[nn.Parameter], float], torch.Tensor] = field(default=_clip)
    """``(runner, trainable parameters, max_norm) -> total norm``, clipping in place."""
    backward: Callable[[torch.Tensor, Any], None] = field(default=_backward)
    """``(loss, stepper)``: the backward of one micro-batch (DeepSpeed's engine also counts it)."""
    accumulates: bool = True
    """Whether several backwards may precede one step (not under BMTrain here: untested)."""
    steps_in_backward: bool = False
    """Whether the optimizer step happens inside ``backward`` (DeepSpeed's engine steps at the
    accumulation boundary): no gradient norm is known before it, and a step cannot be skipped."""

    @property
    def is_main(self) -> bool:
        """Whether this rank reports: prints progress and the summary, writes ``metrics.json``."""
        return self.rank == 0


@dataclass(frozen=True)
class LaunchInfo:
    """This process's place in a launched world, and the launcher it came from (``source``)."""

    rank: int
    world_size: int
    local_rank: int
    source: str = "torchrun"
    """The :class:`LaunchSource` name: ``torchrun``, ``openmpi``, ``mpich`` or ``slurm``."""

    @property
    def launcher(self) -> LaunchSource:
        """The launch source this process came from."""
        return next(s for s in LAUNCH_SOURCES if s.name == self.source)


def launch_info(environ: Mapping[str, str] | None = None) -> LaunchInfo | None:
    """The launcher's world, or ``None`` when no launcher started this process.

    Read from the first of :data:`LAUNCH_SOURCES` whose marker variable is set: torchrun and the
    DeepSpeed launcher (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), Open MPI
    (``OMPI_COMM_WORLD_RANK``, ``_SIZE``, ``_LOCAL_RANK``), MPICH / Intel MPI (``PMI_RANK``,
    ``PMI_SIZE``, ``MPI_LOCALRANKID`` or ``PMI_LOCAL_RANK``), SLURM's srun (``SLURM_PROCID``,
    ``SLURM_NTASKS``, ``SLURM_LOCALID``, in a step: ``SLURM_STEP_ID`` set).

    Raises:
        ConfigError: the marker is set but the source's variables are missing, not integers or
            inconsistent; the message names the variables and their values.
    """
    env = os.environ if environ is None else environ
    source = next((s for s in LAUNCH_SOURCES if s.marker in env), None)
    if source is None:
        return None
    local = next((name for name in source.local_rank if name in env), source.local_rank[0])
    names = (source.rank, source.world_size, local)
    shown = ", ".join(f"{n}={env.get(n, '<unset>')}" for n in source.variables)
    try:
        rank, world_size, local_rank = (int(env[name]) for name in names)
    except (KeyError, ValueError) as err:
        if source.name == "torchrun":
            fix = ("Start the job with deltadist launch torchrun (or torchrun), or unset WORLD_SIZE for a "
                   "single process.")
        else:
            fix = f"Unset {source.marker} for a single process."
        raise ConfigError(
            f"{source.marker} is set, so this looks like a launch by {source.title}, but {shown}; "
            f"it sets {', '.join(names[:2])} and {' or '.join(source.local_rank)} to integers. {fix}"
        ) from err
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ConfigError(f"Inconsistent launch variables from {source.title}: {shown}: needs "
                          f"0 <= {source.rank} < {source.world_size} and {local} >= 0.")
    return LaunchInfo(rank, world_size, local_rank, source.name)


def rendezvous(info: LaunchInfo, env: Mapping[str, str]) -> tuple[str, int] | None:
    """``(MASTER_ADDR, MASTER_PORT)`` for a world not started by torchrun; ``None`` for a world of one
    without them (it needs no rendezvous)."""
    missing = [name for name in RENDEZVOUS_VARIABLES if not env.get(name)]
    launcher = info.launcher
    placed = f"{launcher.rank}={info.rank}, {launcher.world_size}={info.world_size}"
    if missing:
        if info.world_size == 1:
            return None
        raise ConfigError(
            f"This process was started by {launcher.title} ({placed}): the process group meets at "
            f"MASTER_ADDR:MASTER_PORT, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set. Set MASTER_ADDR to the first rank's "
            f"host and MASTER_PORT to a free port in every rank's environment, {launcher.fix}."
        )
    port = env["MASTER_PORT"]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"MASTER_PORT={port} (with MASTER_ADDR={env['MASTER_ADDR']}, from "
                          f"{launcher.title}'s job) must be a port number, 1-65535.")
    return env["MASTER_ADDR"], int(port)


def export_launch_variables(info: LaunchInfo, rendezvous: tuple[str, int]) -> None:
    """Give ``os.environ`` what ``env://`` (and libraries that read ``LOCAL_RANK``) expect after
    torchrun; variables already set are kept."""
    values = {"RANK": info.rank, "WORLD_SIZE": info.world_size, "LOCAL_RANK": info.local_rank,
              "MASTER_ADDR": rendezvous[0], "MASTER_PORT": rendezvous[1]}
    for name, value in values.items():
        os.environ.setdefault(name, str(value))
