"""The Engine protocol: what every step asks about the parallel world a model lives in.

Only modules under ``deltadist/engines/`` know what ``ds_shape``, ``DTensor`` or FSDP are; the rest
of deltadist talks to an :class:`Engine`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from deltadist.engines.runtime import EngineSetup, launch_info
from deltadist.engines.storage import is_quantized_tensor, plain_values, unknown_samples
from deltadist.errors import ConfigError, EngineError

# Logical shapes noted before an engine wraps the model, for engines that keep no trace of them on
# the parameter (FSDP1's flat views). Stored on the parameter object, which FSDP1 preserves (a
# WeakKeyDictionary cannot hold tensors: their ``==`` is element-wise).
_SHAPE_ATTR = "_deltadist_logical_shape"


def record_logical_shapes(model: nn.Module, engine: "Engine", recurse: bool = True) -> None:
    """Remember the logical shape of every parameter of ``model`` (call before wrapping)."""
    for param in model.parameters(recurse=recurse):
        # Through __dict__: hasattr/setattr on tensors are slow enough to matter on 70B models.
        if _SHAPE_ATTR not in param.__dict__:
            param.__dict__[_SHAPE_ATTR] = engine.logical_shape(param)


def recorded_shape(param: torch.Tensor) -> torch.Size | None:
    """The shape noted by :func:`record_logical_shapes`, if any."""
    return getattr(param, _SHAPE_ATTR, None)


def on_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is still on the ``meta`` device."""
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


@dataclass(frozen=True)
class TensorSource:
    """A tensor that can be read whole or by rows, e.g. a memory-mapped safetensors entry."""

    full: Callable[[], torch.Tensor]
    rows: Callable[[int, int], torch.Tensor]
    """``rows(start, stop)``: the rows ``[start, stop)`` along dim 0."""


class Engine:
    """Plain single-process behaviour; engines for sharded setups override the ``_hooks``.

    An engine class owns everything deltadist knows of its engine: its name (the key of
    :data:`deltadist.engines.ENGINES`), how it recognises a model it manages (:meth:`claims`), how
    a job's ranks start (:meth:`launch`), how it wraps a model (:meth:`wrap`), how it reads,
    gathers and scatters tensors, and its limits (:attr:`half_precision_problem`).
    """

    name: ClassVar[str] = "plain"
    trainable_only_state_dict = True
    """Whether ``freeze_module(set_state_dict=True)`` may drop frozen entries from ``state_dict()``."""
    shards_parameters: ClassVar[bool] = False
    """Whether :meth:`wrap` shards the parameters (FSDP): a model built on ``meta`` is then wrapped
    before its weights load; a replicating engine (DDP) wraps a loaded model."""
    half_precision_problem: ClassVar[str | None] = None
    """Why ``deltadist train`` keeps the backbone in float32 under this engine, or ``None``."""
    quantized_weights_problem: ClassVar[str | None] = None
    """Why this engine cannot hold 4-bit (NF4) backbone weights, or ``None``."""
    launcher_script: ClassVar[str] = "torchrun.sh"
    """The script in ``launchers/`` that starts this engine's ranks."""
    accumulates: ClassVar[bool] = True
    """Whether ``deltadist train`` may run several micro-batches per step (its setup's
    :attr:`~deltadist.engines.runtime.EngineSetup.accumulates`), known before the engine starts."""
    steps_in_backward: ClassVar[bool] = False
    """Whether the optimizer steps inside the backward (its setup's
    :attr:`~deltadist.engines.runtime.EngineSetup.steps_in_backward`), known before the engine starts."""
    forwards_together: ClassVar[bool] = False
    """Whether a forward gathers sharded parameters from every rank: ranks must then run equally
    many forwards (text generation passes ``synced_gpus=True``)."""
    generation_problem: ClassVar[str | None] = None
    """Why ``deltadist train`` cannot generate text under this engine (``training.eval_generation``)."""

    @classmethod
    def launch(cls, environ: Mapping[str, str] | None = None, **options: Any) -> "EngineSetup":
        """Start (or join) this engine's world for a job and say where it runs.

        ``environ`` (default ``os.environ``) is where the launcher's variables are read; ``options``
        are the job's settings an engine may need (DeepSpeed: its config and batch sizes).

        Raises:
            ConfigError: this process is one rank of several (plain runs in one process).
        """
        info = launch_info(environ)
        if info is not None and info.world_size > 1:
            raise ConfigError(
                f"engine: {cls.name} runs in one process, but this is rank {info.rank} of a world of "
                f"{info.world_size} (started by {info.launcher.title}). Choose a distributed engine "
                "(--set engine=ddp, fsdp2 or fsdp1; deltadist launch torchrun --engine ...), or run it as "
                "one process."
            )
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return EngineSetup(name=cls.name, device=device, wrap=lambda model: cls.wrap(model, device))

    @classmethod
    def check_options(cls, world_size: int, **options: Any) -> None:
        """Refuse the job's settings (``options``, as :meth:`launch` takes them) that this engine
        cannot run on ``world_size`` ranks, starting nothing (``deltadist train --dry-run``); what
        :meth:`launch` checks of them, it checks here too. One process: nothing to check.

        Raises:
            ConfigError: naming the setting and what to set.
        """

    @classmethod
    def wrap(cls, model: nn.Module, device: torch.device) -> nn.Module:
        """Wrap ``model`` (deltas attached, frozen) for this engine; return what to call and train.
        One process: the model itself, moved to ``device`` unless it is still on ``meta``."""
        return model.to(device) if not on_meta(model) else model

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        """Whether this engine manages ``model`` (detection by duck typing, no optional imports)."""
        return True

    @classmethod
    def for_model(cls, model: nn.Module) -> "Engine":
        """The engine for ``model`` (engines that need to look at the model's wrapping do so here)."""
        return cls()

    def settle(self, model: nn.Module) -> None:
        """Put ``model``'s parameters in their resting (sharded) state before they are listed,
        gathered or written. No-op outside FSDP2."""

    def model_class_name(self, model: nn.Module) -> str:
        """The user's class name of ``model`` (engines may swap the class in place)."""
        return type(model).__name__

    def check_attachable(self, model: nn.Module) -> None:
        """Raise :class:`~deltadist.errors.EngineError` if new parameters cannot join ``model`` now:
        a wrapper (DDP, a DeepSpeed engine) or DeepSpeed's ZeRO-1/2 optimizer already holds it (in a
        world of one too)."""
        wrapper = type(model).__name__
        if wrapper in ("DistributedDataParallel", "DeepSpeedEngine"):
            raise EngineError(
                f"This model is already wrapped in {wrapper}, which only trains and synchronises "
                "the parameters it saw when it was built. Attach deltas to the model before "
                f"wrapping it (for DeepSpeed: before deepspeed.initialize; building the model under "
                "deepspeed.zero.Init is fine)."
            )
        # The inner module of a ZeRO-1/2 engine (``engine.module``) looks like a plain model, but
        # DeepSpeed's optimizer has flattened the parameters it was given and links each one to
        # its fp32 piece through ``_hp_mapping`` (the mark DeepSpeed's own safe_get_full_fp32_param
        # looks for; set on every rank alike). A delta added now would never be stepped. (Read
        # through __dict__: a missing attribute costs hasattr an exception per parameter.)
        if any("_hp_mapping" in p.__dict__ for p in model.parameters()):
            raise EngineError(
                "deepspeed.initialize has already built its ZeRO optimizer over this model's "
                "parameters, so new delta parameters would never be optimised. Attach deltas "
                "before deepspeed.initialize."
            )

    def adopt(self, modules: Iterable[nn.Module]) -> None:
        """Hand the parameters of newly attached delta ``modules`` to the engine (BMTrain makes
        them its distributed parameters). No-op elsewhere: the other engines take new parameters
        when they wrap the model."""

    # -- the parallel world -------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This process's rank in the engine's world."""
        return 0

    @property
    def world_size(self) -> int:
        """How many ranks the engine's world has."""
        return 1

    @property
    def is_main(self) -> bool:
        """Whether this is the rank that writes files and reports (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""

    def broadcast_outcome(self, error: Exception | None, what: str) -> None:
        """After a step only the main rank ran (``what``), raise on every rank if it failed.

        Every rank must call this; ``error`` is the main rank's exception (``None``: success, or
        not the main rank). The main rank re-raises its own error, the others a ``CheckpointError``
        naming it, so no rank is left waiting for a barrier the failed one never reaches.
        """
        if error is not None:
            raise error

    # -- tensors ------------------------------------------------------------------------------
    def stored(self, param: torch.Tensor) -> torch.Tensor:
        """What this rank stores of ``param`` (its local piece, for a sharded parameter)."""
        return param

    def place(self, param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """A new tensor laid out as ``param`` (sharded alike) holding the full ``value``, for
        values that cannot be copied into ``param`` in place (a quantized weight)."""
        return value.to(param.device)

    def logical_shape(self, param: torch.Tensor) -> torch.Size:
        """The full (unsharded) shape of ``param``."""
        return param.shape

    def gather(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full, unsharded CPU copies of ``params``; only the main rank needs the result.

        Must be called on every rank. Only the named tensors are gathered, never the backbone.
        The results never share storage with ``params``: training on does not change them.
        """
        copies = {}
        for name, param in params.items():
            full = plain_values(self._full_tensor(param)).detach()  # before detach: it drops a subclass
            copy = full.to("cpu", memory_format=torch.contiguous_format)
            # `.to` copies when the device or layout changes (a GPU parameter: one copy, no more)
            # and returns `full` itself otherwise; a CPU parameter must then be cloned, or the
            # result would be the live parameter. A freshly gathered CPU tensor is cloned too: only
            # the engine knows it is fresh, and CPU-sharded training is rare.
            if copy.untyped_storage().data_ptr() == full.untyped_storage().data_ptr():
                copy = copy.clone()
            copies[name] = copy
        return copies

    @contextlib.contextmanager
    def whole(self, params: Sequence[torch.Tensor]) -> Iterator[None]:
        """``params`` whole on every rank for the duration of the block, inside a forward (a
        parameter offset reads its site's parameter and its delta's when the engine has not
        fetched them yet); read them, never keep them."""
        yield

    def scatter(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Copy the full tensor ``value`` into ``param``, whatever its sharding. Every rank calls it."""
        with torch.no_grad():
            param.copy_(value.to(device=param.device, dtype=param.dtype))

    def load(self, param: torch.Tensor, source: TensorSource) -> None:
        """Fill ``param`` from ``source``, reading no more of it than this rank keeps if possible."""
        self.scatter(param, source.full())

    def sample(self, param: torch.Tensor, flat_indices: torch.Tensor) -> torch.Tensor | None:
        """Values of the logical tensor at ``flat_indices`` (CPU, float64), or ``None`` on meta."""
        if param.device.type == "meta":
            return None
        if is_quantized_tensor(self.stored(param)):
            return unknown_samples(flat_indices)
        flat = self._full_tensor(param).detach().reshape(-1)
        return flat[flat_indices.to(flat.device)].to("cpu", torch.float64)

    def sample_many(self, requests: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor | None]:
        """:meth:`sample` of each ``(param, flat_indices)``; engines that sample by collectives
        run them together. Every rank calls it with the same requests."""
        return [self.sample(param, indices) for param, indices in requests]

    def _full_tensor(self, param: torch.Tensor) -> torch.Tensor:
        return param
