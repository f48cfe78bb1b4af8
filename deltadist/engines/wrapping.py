"""Wrapping a delta-fitted model for an engine: DDP, FSDP2 (``fully_shard``) or FSDP1."""

from __future__ import annotations

import torch
from torch import nn

from deltadist.engines import Engine, record_logical_shapes
from deltadist.errors import ConfigError, EngineError

ENGINE_NAMES: tuple[str, ...] = ("plain", "ddp", "fsdp2", "fsdp1")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: children of a ``ModuleList`` whose items all share one class."""
    blocks: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            if len({type(child) for child in module}) == 1:
                blocks.extend(module)
    return blocks


def wrap_model(model: nn.Module, engine: str, device: torch.device) -> nn.Module:
    """Wrap ``model`` (deltas attached, frozen) for ``engine``; return what to call and train.

    ``fsdp2`` shards every repeated block and then the root with ``fully_shard`` (in place, the
    returned model is ``model``); ``fsdp1`` wraps with ``use_orig_params=True`` (needed to mix
    frozen and trainable parameters in one unit), one unit per block; ``ddp`` wraps in
    ``DistributedDataParallel``. Parameters still on ``meta`` are materialised on ``device``
    by FSDP (values must be loaded afterwards).
    """
    if engine not in ENGINE_NAMES:
        raise ConfigError(f"Unknown engine {engine!r}; deltadist knows {', '.join(ENGINE_NAMES)}.")
    if engine == "plain":
        return model.to(device) if not on_meta(model) else model
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if on_meta(model):
            raise EngineError("DDP needs real weights: materialise and load before wrapping.")
        model.to(device)
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        for block in repeated_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    _check_one_dtype(model)
    block_types = {type(b) for b in repeated_blocks(model)}
    return FullyShardedDataParallel(
        model, use_orig_params=True, device_id=device,
        auto_wrap_policy=ModuleWrapPolicy(block_types) if block_types else None,
        param_init_fn=(lambda m: _materialise_unit(m, device)) if on_meta(model) else None,
    )


def _check_one_dtype(model: nn.Module) -> None:
    """FSDP1 flattens each unit's parameters into one tensor, so they must share one dtype."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    if len(dtypes) > 1:
        raise ConfigError(
            f"FSDP1 needs one parameter dtype per unit, but this model mixes {' and '.join(dtypes)} "
            "(delta_dtype='auto' keeps deltas in float32 on a half-precision backbone). Use fsdp2, "
            "which keeps trainable parameters apart; or keep the backbone in float32 and let "
            "MixedPrecision(param_dtype=torch.bfloat16) compute in half precision; or build the "
            "delta with delta_dtype='site'."
        )


def _materialise_unit(module: nn.Module, device: torch.device) -> None:
    """FSDP1's ``param_init_fn``: real storage for one module, and its shapes noted for the engine.

    ``to_empty`` makes new parameter objects, so the shapes noted on the meta ones are lost.
    """
    module.to_empty(device=device, recurse=False)
    record_logical_shapes(module, Engine(), recurse=False)


def on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])
