"""``engine: deepspeed`` for the training job: the DeepSpeed config and ``deepspeed.initialize``.

The job passes its own torch AdamW over the delta's parameters, so a DeepSpeed JSON must not carry
an ``optimizer`` or ``scheduler`` section; batch sizes come from ``training.batch_size``; every
other ``"auto"`` is dropped so DeepSpeed's default applies -- except gradient clipping, which
DeepSpeed defaults to 1.0 and the other engines do not do, so it is turned off.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from deltadist.engines.batch_split import split_batch
from deltadist.engines.runtime import EngineSetup
from deltadist.errors import ConfigError

DEEPSPEED_DEFAULT_CONFIG: dict[str, Any] = {"zero_optimization": {"stage": 3}}
MIN_DEEPSPEED = (0, 19)
"""PyTorch-style ``loss.backward()`` on the engine's output needs DeepSpeed >= 0.19."""


def resolve_deepspeed_config(path: str | os.PathLike | None, batch_size: int, world_size: int,
                             max_grad_norm: float | None = None, micro_batch_size: int | None = None,
                             accumulation: int | None = None) -> dict[str, Any]:
    """The JSON at ``path`` (default: ZeRO-3), made concrete for this job.

    ``max_grad_norm`` (``training.max_grad_norm``) becomes ``gradient_clipping`` where the JSON
    leaves it ``"auto"`` or unset: DeepSpeed clips inside its step.

    Raises:
        ConfigError: unreadable JSON, an optimizer/scheduler section, fp16/bf16 turned on, or batch
            sizes that contradict ``training.batch_size`` on ``world_size`` ranks.
    """
    where = "the built-in DeepSpeed config" if path is None else f"deepspeed_config {str(path)!r}"
    config = copy.deepcopy(DEEPSPEED_DEFAULT_CONFIG) if path is None else _read_json(path, where)
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ConfigError(f"{where}: remove the {section!r} section; deltadist train passes its own "
                              "torch AdamW over the delta's parameters (training.lr).")
    for section in ("fp16", "bf16"):
        if config.get(section, {}).get("enabled", False) not in (False, "auto"):
            raise ConfigError(f"{where}: {section} is not supported by deltadist train (fp32 only); "
                              f'set "{section}": {{"enabled": false}} or "auto".')
        config.pop(section, None)
    micro_batch_size, accumulation = split_batch(batch_size, micro_batch_size, accumulation, world_size)
    fixed = {"train_batch_size": batch_size,
             "train_micro_batch_size_per_gpu": micro_batch_size,
             "gradient_accumulation_steps": accumulation}
    for key, value in fixed.items():
        if config.get(key, "auto") not in ("auto", value):
            raise ConfigError(f"{where}: {key} is {config[key]!r}, but training.batch_size={batch_size} "
                              f'on {world_size} ranks needs {value}; set it to "auto".')
        config[key] = value
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = max_grad_norm or 0.0
    config.setdefault("zero_allow_untested_optimizer", True)  # a torch optimizer
    config.setdefault("steps_per_print", 10**9)
    return _drop_auto(config)


def _read_json(path: str | os.PathLike, where: str) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{where}: cannot read it as JSON: {err}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: must hold a JSON object.")
    return config


def _drop_auto(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_auto(v) for k, v in node.items() if v != "auto"}
    return node


def import_deepspeed() -> Any:
    """``deepspeed``, on its CPU accelerator when there is no GPU, at a supported version."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    try:
        import deepspeed
    except ImportError as err:
        raise ConfigError("engine: deepspeed needs DeepSpeed: pip install 'deltadist[deepspeed]'.") from err
    version = tuple(int(p) for p in deepspeed.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_DEEPSPEED:
        raise ConfigError(f"engine: deepspeed needs DeepSpeed >= 0.19, found {deepspeed.__version__}.")
    return deepspeed


LOSS_SCALER_KEY = "loss_scaler"
OBJECT_KEYS = (LOSS_SCALER_KEY, "param_slice_mappings", "universal_checkpoint_info")
"""Entries of a ZeRO optimizer's state dict that hold Python objects rather than tensors and
numbers: the loss scaler (a constant 1 here: the job is fp32 under DeepSpeed) and the fragment maps
that only DeepSpeed's universal checkpoints read. A resumable checkpoint leaves them out."""


class DeepSpeedStepper:
    """Optimizer stand-in for the loop: ``step()`` is ``engine.step()`` (reduce, step, clear grads).

    ``loss.backward()`` on the engine's output is DeepSpeed's own backward (DeepSpeed >= 0.19).
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: the engine clears the gradients when it steps."""

    def backward(self, loss: Any) -> None:
        """One micro-batch: DeepSpeed divides each gradient by its accumulation steps, while the
        job's loss is already its part of the global batch's mean, so that division is undone;
        then ``engine.step()``, which steps the optimizer at the accumulation boundary only."""
        (loss * self.engine.gradient_accumulation_steps()).backward()
        self.engine.step()

    def step(self) -> None:
        """Nothing to do: :meth:`backward` stepped the engine at the boundary."""

    def state_dict(self) -> dict[str, Any]:
        """This rank's ZeRO optimizer state (its partitions), without :data:`OBJECT_KEYS`."""
        return {k: v for k, v in self.engine.optimizer.state_dict().items() if k not in OBJECT_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load this rank's state (saved by :meth:`state_dict` on this rank of the same world).

        DeepSpeed takes a list of every rank's state and reads its own rank's entry, so this
        rank's fills the list; the weights themselves come from the module (ZeRO-1/2 copies the
        loaded delta into its fp32 partitions) or from the saved partitions (ZeRO-3)."""
        import torch.distributed as dist

        own = {**state, LOSS_SCALER_KEY: self.engine.optimizer.loss_scaler}
        self.engine.optimizer.load_state_dict([own] * dist.get_world_size(), load_optimizer_states=True)


def launch_deepspeed(base: EngineSetup, deepspeed_config: str | None, batch_size: int,
                     micro_batch_size: int | None, accumulation: int | None,
                     max_grad_norm: float | None) -> EngineSetup:
    """``base`` (the process group's setup) made DeepSpeed's: ``prepare`` runs
    ``deepspeed.initialize`` on the model and optimizer, the engine steps, clips and counts
    micro-batches. The group is closed again if the config cannot be resolved."""
    deepspeed = import_deepspeed()
    try:
        config = resolve_deepspeed_config(deepspeed_config, batch_size, base.world_size, max_grad_norm,
                                          micro_batch_size, accumulation)
    except BaseException:
        base.close()
        raise

    def prepare(model: nn.Module, optimizer: Any) -> tuple[nn.Module, Any]:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return engine, DeepSpeedStepper(engine)

    def clip(runner: nn.Module, parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.tensor(float("nan"))  # DeepSpeed clips in its step (gradient_clipping)

    # DeepSpeed counts micro-batches itself (its step() steps the optimizer at the boundary) and
    # reduces at the boundary: no deferral to ask for (its no_sync() refuses ZeRO-2/3).
    return dataclasses.replace(base, prepare=prepare, clip_grad_norm=clip, gradient_sync=_no_deferral,
                               backward=lambda loss, stepper: stepper.backward(loss), steps_in_backward=True)


@contextlib.contextmanager
def _no_deferral(runner: nn.Module, sync: bool) -> Iterator[None]:
    yield
