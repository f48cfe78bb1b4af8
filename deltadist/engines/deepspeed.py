"""DeepSpeed ZeRO-3: partitioned parameters (``shape == (0,)``, real shape in ``ds_shape``).

Each partitioned parameter keeps its logical shape in ``ds_shape`` and this rank's slice of the
flattened values in ``ds_tensor``: rank ``r`` *of the parameter's own partition group*
``ds_process_group`` holds elements ``[r * n, (r + 1) * n)``, ``n`` being the padded partition size.
That group is the data-parallel group, which may be smaller than the world; ZeRO++'s hierarchical
partitioning (``zero_hpz_partition_size``) keeps this primary partition over it and only adds a
secondary copy (``ds_secondary_tensor``) split over the smaller hpZ group. A delta is gathered
with ``GatheredParameters`` over the delta list only -- never the consolidated model -- and
written back with ``modifier_rank=0``, which re-partitions the new values (both copies) on exit.
ZeRO-1/2 keep parameters whole, so they need nothing beyond the DDP engine (which refuses new
deltas once DeepSpeed's optimizer holds the model). ``deepspeed`` is imported only when a
partitioned model is seen.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from deltadist.engines.distributed import DistributedEngine, distributed_ready, sample_from_pieces
from deltadist.engines.runtime import EngineSetup
from deltadist.errors import EngineError


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ZeRO-3 partitions ``param`` (it carries ``ds_id`` and its logical ``ds_shape``)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_shape")


class ZeRO3Engine(DistributedEngine):
    """Engine for models whose parameters ZeRO-3 partitions (``zero.Init`` or after initialize)."""

    name = "deepspeed"
    quantized_weights_problem = "ZeRO partitions and casts every parameter as a plain tensor; fsdp2 holds NF4"
    half_precision_problem = "DeepSpeed's own bf16/fp16 modes are not wired to deltadist train yet"
    launcher_script = "deepspeed.sh"
    steps_in_backward = True
    forwards_together = True

    @classmethod
    def launch(cls, environ: Mapping[str, str] | None = None, *, deepspeed_config: str | None = None,
               batch_size: int = 32, micro_batch_size: int | None = None, accumulation: int | None = None,
               max_grad_norm: float | None = None, **_: Any) -> EngineSetup:
        """ZeRO from a DeepSpeed JSON; the process group as for DDP; ``deepspeed.initialize``
        (in the setup's ``prepare``) takes the model and the optimizer together."""
        from deltadist.engines.deepspeed_runtime import launch_deepspeed

        base = super().launch(environ)
        return launch_deepspeed(base, deepspeed_config, batch_size, micro_batch_size, accumulation,
                                max_grad_norm)

    @classmethod
    def check_options(cls, world_size: int, *, deepspeed_config: str | None = None, batch_size: int = 32,
                      micro_batch_size: int | None = None, accumulation: int | None = None,
                      max_grad_norm: float | None = None, **_: Any) -> None:
        """The DeepSpeed JSON resolved for the job as :meth:`launch` resolves it (deepspeed is not
        imported)."""
        from deltadist.engines.deepspeed_runtime import resolve_deepspeed_config

        resolve_deepspeed_config(deepspeed_config, batch_size, world_size, max_grad_norm, micro_batch_size,
                                 accumulation)

    @classmethod
    def wrap(cls, model: nn.Module, device: torch.device) -> nn.Module:
        """Onto the device only: ``deepspeed.initialize`` wraps and partitions it in ``prepare``."""
        return model.to(device)

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        return distributed_ready() and any(is_partitioned(p) for p in model.parameters())

    def check_attachable(self, model: nn.Module) -> None:
        super().check_attachable(model)
        # deepspeed.initialize hooks every module for parameter fetching and marks it with
        # ``ds_grads_remaining``; zero.Init alone does not, and new parameters may still join then.
        if any(hasattr(m, "ds_grads_remaining") for m in model.modules()):
            raise EngineError(
                "deepspeed.initialize has already wrapped this model, so new delta parameters would "
                "be neither partitioned nor optimised. Attach deltas before deepspeed.initialize "
                "(building the model under deepspeed.zero.Init is fine)."
            )

    def logical_shape(self, param: torch.Tensor) -> torch.Size:
        return param.ds_shape if is_partitioned(param) else param.shape

    def gather(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import deepspeed

        partitioned = [p for p in params.values() if is_partitioned(p)]
        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            return {name: p.detach().to("cpu").clone().contiguous() for name, p in params.items()}

    @contextlib.contextmanager
    def whole(self, params: Sequence[torch.Tensor]) -> Iterator[None]:
        """The partitioned ones of ``params`` gathered for the block. DeepSpeed's pre-forward hook
        of the module may not have run yet (hooks registered before ``deepspeed.initialize`` run
        first), or none runs: the module is called by itself inside a ZeRO leaf module (by
        default the sparse-MoE blocks of Mixtral and Qwen-MoE), whose hook fetches the whole block.
        With gradients, a trainable one inside a leaf is refused: gathered here, it would be
        partitioned again before the backward reads it, and no hook inside a leaf fetches it then.

        Raises:
            EngineError: a trainable parameter inside a ZeRO leaf module, not fetched, under grad.
        """
        missing = [p for p in params if is_partitioned(p) and p.numel() != p.ds_numel]
        if not missing:
            yield
            return
        # Inside a leaf no DeepSpeed hook fetches a trainable one again for the backward.
        if torch.is_grad_enabled() and any(
                p.requires_grad and getattr(p, "ds_z3_leaf_module", None) is not None for p in missing):
            raise EngineError(
                "ZeRO-3 has not fetched a delta's parameters for this call (a module called by itself "
                "inside a ZeRO leaf module, which DeepSpeed fetches whole only at the leaf's forward), "
                "and parameters gathered here would be partitioned again before the backward reads them. "
                "Call the module through its block, under torch.no_grad(), or leave its block out of "
                "zero_optimization.leaf_module.classes.")
        import deepspeed

        with deepspeed.zero.GatheredParameters(missing, modifier_rank=None):
            yield

    def scatter(self, param: torch.Tensor, value: torch.Tensor) -> None:
        if not is_partitioned(param):
            return super().scatter(param, value)
        import deepspeed

        # modifier_rank counts in the parameter's partition group, not the world.
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if dist.get_rank(group=param.ds_process_group) == 0:
                with torch.no_grad():
                    param.data.copy_(value.to(device=param.device, dtype=param.dtype))

    def sample(self, param: torch.Tensor, flat_indices: torch.Tensor) -> torch.Tensor | None:
        if not is_partitioned(param):
            return super().sample(param, flat_indices)
        # Rank r of the partition group holds flat elements [r * n, (r + 1) * n), n being the
        # (padded) partition size; the other pieces are on that group only, so the sum runs there.
        group = param.ds_process_group
        start = dist.get_rank(group=group) * param.ds_tensor.numel()
        return sample_from_pieces(param.ds_tensor, start, flat_indices, group)
