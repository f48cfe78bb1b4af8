"""Where the job runs: the single dispatch point from ``config.engine`` to a device and wrapper.

``plain``: one process, one GPU when CUDA is available, else the CPU. ``ddp``, ``fsdp2``, ``fsdp1``:
one process per rank, started by ``torchrun`` (``launchers/torchrun.sh``); the default process
group is initialised here (NCCL on ``cuda:LOCAL_RANK`` when CUDA is available, else gloo on the
CPU), the delta-fitted model is wrapped by :func:`deltadist.engines.setup.wrap_model`, and
:meth:`EngineSetup.close` destroys the group at the end. Started without torchrun, a distributed
engine runs as a world of one (an in-process store, no port), which is handy for trying a config.

This is the only module of the training job that knows about ``torch.distributed``; the loop
sees an :class:`EngineSetup` (device, wrap, rank, world size, close).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from deltadist.errors import ConfigError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""Environment variables ``torchrun`` (and ``accelerate launch``) set in every rank."""


def _nothing() -> None:
    return None


def _as_is(runner: nn.Module, optimizer: Any) -> tuple[nn.Module, Any]:
    return runner, optimizer


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

    @property
    def is_main(self) -> bool:
        """Whether this rank reports: prints progress and the summary, writes ``metrics.json``."""
        return self.rank == 0


@dataclass(frozen=True)
class LaunchInfo:
    """This process's place in a launched world (from ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

    rank: int
    world_size: int
    local_rank: int


def launch_info(environ: Mapping[str, str] | None = None) -> LaunchInfo | None:
    """The launcher's world, or ``None`` when not started by torchrun (no ``WORLD_SIZE``).

    Raises:
        ConfigError: ``WORLD_SIZE`` is set but the other variables are missing or malformed.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    try:
        values = {name: int(env[name]) for name in LAUNCH_VARIABLES}
    except (KeyError, ValueError) as err:
        shown = ", ".join(f"{n}={env.get(n, '<unset>')}" for n in LAUNCH_VARIABLES)
        raise ConfigError(
            f"WORLD_SIZE is set, so this looks like a torchrun launch, but {shown}: torchrun sets all "
            "three to integers. Start the job with launchers/torchrun.sh (or torchrun), or unset "
            "WORLD_SIZE for a single process."
        ) from err
    info = LaunchInfo(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if info.world_size < 1 or not 0 <= info.rank < info.world_size or info.local_rank < 0:
        raise ConfigError(f"Inconsistent launch variables: RANK={info.rank}, "
                          f"WORLD_SIZE={info.world_size}, LOCAL_RANK={info.local_rank}.")
    return info


def _plain(environ: Mapping[str, str] | None = None, **_: Any) -> EngineSetup:
    info = launch_info(environ)
    if info is not None and info.world_size > 1:
        raise ConfigError(
            f"engine: plain runs in one process, but this is rank {info.rank} of a world of "
            f"{info.world_size} (started by torchrun). Choose a distributed engine (--set "
            "engine=ddp, fsdp2 or fsdp1; launchers/torchrun.sh --engine ...), or run without torchrun."
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return EngineSetup(name="plain", device=device, wrap=lambda model: model)


def _distributed(name: str) -> Callable[..., EngineSetup]:
    def setup(environ: Mapping[str, str] | None = None, **_: Any) -> EngineSetup:
        import torch.distributed as dist

        from deltadist.engines.setup import wrap_model

        info = launch_info(environ)
        cuda = torch.cuda.is_available()
        if info is not None:
            local_rank = info.local_rank
        elif dist.is_initialized() and cuda:  # a group someone else started: one GPU per rank
            local_rank = dist.get_rank() % torch.cuda.device_count()
        else:
            local_rank = 0
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        owned = not dist.is_initialized()
        if owned:
            backend = "nccl" if cuda else "gloo"
            if info is not None:
                dist.init_process_group(backend, device_id=device if cuda else None)
            else:
                launcher = "deepspeed.sh" if name == "deepspeed" else "torchrun.sh"
                print(f"deltadist: engine {name} started without a launcher: running as a world of "
                      f"1. Use launchers/{launcher} --nproc N for N ranks.", file=sys.stderr)
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)

        def close() -> None:
            if owned and dist.is_initialized():
                dist.destroy_process_group()

        if info is not None and dist.get_world_size() != info.world_size:
            close()
            raise ConfigError(f"WORLD_SIZE={info.world_size} but the process group has "
                              f"{dist.get_world_size()} ranks.")

        def wrap(model: nn.Module) -> nn.Module:
            with warnings.catch_warnings():
                # FSDP1 warns once per unit that mixes frozen and trainable parameters (every
                # LoRA'd layer, on every rank): the expected cost of one unit per block.
                warnings.filterwarnings("ignore", message=".*has both parameters with requires_grad")
                return wrap_model(model, name, device)

        return EngineSetup(
            name=name, device=device, wrap=wrap,
            rank=dist.get_rank(), world_size=dist.get_world_size(), close=close,
        )

    return setup


def _deepspeed(environ: Mapping[str, str] | None = None, *, deepspeed_config: str | None = None,
               batch_size: int = 32) -> EngineSetup:
    """ZeRO from a DeepSpeed JSON; the process group as for DDP; ``deepspeed.initialize`` joins it."""
    from deltadist.engines.deepspeed_runtime import (
        DeepSpeedStepper, import_deepspeed, resolve_deepspeed_config,
    )

    deepspeed = import_deepspeed()
    base = _distributed("deepspeed")(environ)
    try:
        config = resolve_deepspeed_config(deepspeed_config, batch_size, base.world_size)
    except BaseException:
        base.close()
        raise

    def prepare(model: nn.Module, optimizer: Any) -> tuple[nn.Module, Any]:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return engine, DeepSpeedStepper(engine)

    return dataclasses.replace(base, wrap=lambda model: model.to(base.device), prepare=prepare)


ENGINES: dict[str, Callable[..., EngineSetup]] = {
    "plain": _plain,
    "ddp": _distributed("ddp"),
    "fsdp2": _distributed("fsdp2"),
    "fsdp1": _distributed("fsdp1"),
    "deepspeed": _deepspeed,
}


def setup_engine(name: str, environ: Mapping[str, str] | None = None, **options: Any) -> EngineSetup:
    """The :class:`EngineSetup` for engine ``name`` (initialising the process group if needed).

    ``environ`` (default ``os.environ``) is where the launcher's variables are read.

    Raises:
        ConfigError: no engine of that name (the message lists the available ones), ``plain`` in
            a world of several ranks, or malformed launch variables.
    """
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; available engines: {', '.join(ENGINES)}.")
    return ENGINES[name](environ, **options)
