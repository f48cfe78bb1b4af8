"""Shared pieces of the torch.distributed engines: the process group and small collectives."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from deltadist.engines.base import Engine, on_meta
from deltadist.engines.runtime import EngineSetup
from deltadist.engines.storage import is_quantized_tensor
from deltadist.errors import CheckpointError, EngineError


def distributed_ready() -> bool:
    """Whether a default process group is up (several ranks may be running)."""
    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """The device collectives run on: the current CUDA device under NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_pieces(piece: torch.Tensor, group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """Every rank's 1-D ``piece`` (lengths may differ) in ``group`` (default: the world), in rank
    order, on the CPU."""
    device = collective_device()
    size = dist.get_world_size(group)
    length = torch.tensor([piece.numel()], device=device)
    lengths = [torch.zeros_like(length) for _ in range(size)]
    dist.all_gather(lengths, length, group=group)
    longest = max(int(n) for n in lengths)
    padded = torch.zeros(longest, dtype=piece.dtype, device=device)
    padded[: piece.numel()] = piece.reshape(-1).to(device)
    gathered = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(gathered, padded, group=group)
    return [g[: int(n)].cpu() for g, n in zip(gathered, lengths)]


def piece_offsets(piece_numel: int, group: dist.ProcessGroup | None = None) -> list[int]:
    """Start offset of every rank's piece (in ``group``) when the pieces are laid end to end in
    rank order."""
    device = collective_device()
    length = torch.tensor([piece_numel], device=device)
    lengths = [torch.zeros_like(length) for _ in range(dist.get_world_size(group))]
    dist.all_gather(lengths, length, group=group)
    offsets, total = [], 0
    for n in lengths:
        offsets.append(total)
        total += int(n)
    return offsets


def sample_from_pieces(piece: torch.Tensor, start: int, flat_indices: torch.Tensor,
                       group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Values at ``flat_indices`` of a tensor laid out as per-rank contiguous pieces in ``group``.

    ``piece`` is this rank's slice of the flattened tensor, beginning at flat position ``start``.
    Each rank fills in the positions it holds; a sum across the group completes the vector, so
    only the sampled values travel (float64, CPU).
    """
    flat = piece.detach().reshape(-1)
    mine = (flat_indices >= start) & (flat_indices < start + flat.numel())
    values = torch.zeros(len(flat_indices), dtype=torch.float64)
    values[mine] = flat[(flat_indices[mine] - start).to(flat.device)].to("cpu", torch.float64)
    return sum_across_ranks(values, group)


def sum_across_ranks(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Element-wise sum over the ranks of ``group`` (default: the world; CPU in, CPU out).

    Inside :func:`sums_together` the sum is only recorded: the tensor returned is filled when the
    block ends, with every recorded sum of one group done in one collective.
    """
    if _PENDING:
        out = torch.zeros_like(values)
        _PENDING[-1].setdefault(group, []).append((values, out))
        return out
    reduced = values.to(collective_device())
    dist.all_reduce(reduced, group=group)
    return reduced.cpu()


_PENDING: list[dict[Any, list[tuple[torch.Tensor, torch.Tensor]]]] = []
"""The open :func:`sums_together` blocks: per group, ``(this rank's values, where the sum goes)``."""


@contextlib.contextmanager
def sums_together() -> Iterator[None]:
    """Sum every :func:`sum_across_ranks` of the block in one ``all_reduce`` per group, at its end.

    A fingerprint samples every backbone tensor; one collective per tensor made the cost of saving
    grow with the backbone's number of tensors (a few hundred round trips on a 70B model). Every
    rank must run the same block, so that the groups' collectives meet in the same order.
    """
    _PENDING.append({})
    try:
        yield
    finally:
        pending = _PENDING.pop()
    for group, entries in pending.items():  # first-seen order: the same on every rank
        summed = sum_across_ranks(torch.cat([values.reshape(-1) for values, _ in entries]), group)
        for (values, out), part in zip(entries, summed.split([v.numel() for v, _ in entries])):
            out.copy_(part.view_as(out))


class DistributedEngine(Engine):
    """Rank, world size and barrier from the default process group; parameters replicated (DDP)."""

    name = "ddp"

    @classmethod
    def launch(cls, environ: Mapping[str, str] | None = None, **options: Any) -> EngineSetup:
        """One process per rank on the default process group (see
        :mod:`deltadist.engines.process_group`), the model wrapped by :meth:`wrap`."""
        from deltadist.engines.process_group import start_process_group

        return start_process_group(cls.name, cls.wrap, os.environ if environ is None else environ,
                                   cls.launcher_script)

    def sample_many(self, requests: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor | None]:
        with sums_together():  # one collective per group for all the samples, not one per tensor
            return super().sample_many(requests)

    @classmethod
    def wrap(cls, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``DistributedDataParallel`` over the loaded model (it copies rank 0's values when built)."""
        from torch.nn.parallel import DistributedDataParallel

        if on_meta(model):
            raise EngineError("DDP needs real weights: materialise and load before wrapping.")
        model.to(device)
        ids = [device.index] if device.type == "cuda" else None
        # DDP copies rank 0's parameters to the others through flat buffers; a 4-bit weight
        # (torchao's NF4 tensor) comes out of that with other values (logits 5e-4 apart,
        # measured). Frozen and read from the same checkpoint on every rank, it needs no copy.
        quantized = [name for name, param in model.named_parameters() if is_quantized_tensor(param)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, quantized)
        return DistributedDataParallel(model, device_ids=ids)

    @classmethod
    def claims(cls, model: torch.nn.Module) -> bool:
        return distributed_ready() and dist.get_world_size() > 1

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_outcome(self, error: Exception | None, what: str) -> None:
        # One small broadcast from the main rank replaces the barrier: it waits for the main
        # rank's step too, and tells every rank how it ended.
        outcome = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(outcome, src=0)
        if error is not None:
            raise error
        if outcome[0] is not None:
            raise CheckpointError(f"Rank 0 failed while {what}: {outcome[0]}")
