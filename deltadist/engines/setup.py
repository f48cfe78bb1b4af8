"""Wrapping a delta-fitted model for an engine, and the meta-device setup order, in one place.

The order for a sharded run (torchtune's, made a function so no script copies it)::

    build backbone on meta -> attach deltas (meta) -> freeze -> wrap/shard -> materialise
    -> load base weights -> initialise deltas -> recompute buffers -> check nothing is on meta

DDP is the exception: it copies rank 0's values at construction, so it wraps last.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping

import torch
from safetensors import safe_open
from torch import nn

from deltadist.addressing.names import canonical_name
from deltadist.attach import delta_parameter_ids
from deltadist.engines import Engine, detect_engine, record_logical_shapes
from deltadist.engines.base import TensorSource
from deltadist.errors import CheckpointError, ConfigError, EngineError
from deltadist.record import delta_key

EngineName = Literal["plain", "ddp", "fsdp2", "fsdp1"]
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
        return model.to(device) if not _on_meta(model) else model
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if _on_meta(model):
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
        param_init_fn=(lambda m: _materialise_unit(m, device)) if _on_meta(model) else None,
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


@dataclass
class PreparedModel:
    """What :func:`prepare_model` returns."""

    model: nn.Module
    """Call and train this (the engine's wrapper, or the backbone itself)."""
    backbone: nn.Module
    """The unwrapped backbone the delta is attached to."""
    delta: Any
    """The delta object (a ``DeltaBase``): ``save_finetuned`` it on every rank."""


def prepare_model(build_backbone: Callable[[], nn.Module], delta_config: Mapping[str, Any] | Any,
                  engine: str, weights: str | os.PathLike, *, weights_prefix: str = "",
                  device: torch.device | str = "cpu", delta_seed: int = 0) -> PreparedModel:
    """Build a backbone on ``meta``, attach and freeze a delta, shard, and fill in real values.

    Args:
        build_backbone: makes the backbone (called under ``torch.device("meta")``: instant).
        delta_config: a delta config or its dict (``{"delta_type": "lora", ...}``).
        engine: ``plain``, ``ddp``, ``fsdp2`` or ``fsdp1``.
        weights: a transformers checkpoint directory (``model.safetensors`` or a sharded index).
            Tensors are memory-mapped and read one at a time; under FSDP2 each rank reads only
            the rows of its own shard.
        weights_prefix: submodule of the backbone that the checkpoint's keys are relative to.
        device: where parameters live (``cuda:<local rank>`` on GPUs).
        delta_seed: seed of the delta initialisation (the same on every rank and engine, so a
            sharded run starts exactly where a single-process one does).

    Raises:
        CheckpointError: the weights are missing a backbone tensor (listed) or do not fit.
        EngineError: something is still on ``meta`` at the end (named).
    """
    from deltadist.api.auto import AutoDeltaModel

    device = torch.device(device)
    with torch.device("meta"):
        backbone = build_backbone()
    delta = AutoDeltaModel.from_config(delta_config, backbone_model=backbone)
    delta.freeze_module()
    initial = _initial_delta_values(delta, delta_seed)
    # Classes are noted before wrapping: fully_shard swaps the class of the modules it shards.
    buffer_owners = {
        owner: (type(backbone.get_submodule(owner)), _nearest_config(backbone, owner))
        for owner in {n.rpartition(".")[0] for n, b in backbone.named_buffers() if b.is_meta}
    }
    tied = _tied_parameters(backbone)
    model = backbone if engine in ("ddp", "plain") else wrap_model(backbone, engine, device)
    if _on_meta(backbone):
        backbone.to_empty(device=device)
        if engine in ("ddp", "plain"):
            _retie(backbone, tied)
    _recompute_buffers(backbone, buffer_owners, device)
    _load_weights(backbone, weights, weights_prefix, tied)
    for name, param in delta.delta_parameters().items():
        delta.engine.scatter(param, initial[name])
    delta._initialize_from_backbone()  # e.g. a soft prompt copied from the loaded embeddings
    _check_nothing_on_meta(backbone)
    if engine == "ddp":
        model = wrap_model(backbone, engine, device)
    return PreparedModel(model=model, backbone=backbone, delta=delta)


def _tied_parameters(model: nn.Module) -> list[list[str]]:
    """Names of parameters shared by several modules (tied embeddings), grouped."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Share parameters again after ``to_empty``, which gives every module its own copy."""
    for first, *others in groups:
        shared = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _initial_delta_values(delta: Any, seed: int) -> dict[str, torch.Tensor]:
    """Initial values of every delta parameter, computed on CPU twins under ``seed``.

    Twins are initialised in attach order, as a delta built on real weights is, so both paths
    start from the same values when seeded alike.
    """
    values: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for att in delta.record.attachments:
            twin = copy.deepcopy(att.delta).to_empty(device="cpu")
            twin.reset_parameters()
            for name, param in twin.named_parameters():
                values[delta_key(att.site_name, att.base_name, name)] = param.detach()
    return values


def _checkpoint_files(weights: str | os.PathLike) -> list[Path]:
    directory = Path(weights)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"No model.safetensors (or its index) in {directory}; save the backbone "
                          "with save_pretrained(..., safe_serialization=True).")


def _iter_checkpoint(weights: str | os.PathLike) -> Iterator[tuple[str, TensorSource]]:
    """Every tensor of the checkpoint, memory-mapped: read whole or only some rows."""
    for path in _checkpoint_files(weights):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                yield key, TensorSource(
                    full=lambda h=handle, k=key: h.get_tensor(k),
                    rows=lambda start, stop, h=handle, k=key: h.get_slice(k)[start:stop],
                )


def _load_weights(backbone: nn.Module, weights: str | os.PathLike, prefix: str,
                  tied: list[list[str]] = ()) -> None:
    """Copy checkpoint tensors into the backbone's own (non-delta) parameters and buffers.

    A checkpoint stores tied weights once; ``tied`` (groups of names, noted before wrapping) lets
    that one tensor fill every member, also where an engine (FSDP1) has untied them.
    """
    root = backbone.get_submodule(prefix) if prefix else backbone
    targets: dict[str, list[torch.Tensor]] = {}
    for name, tensor in [*root.named_parameters(remove_duplicate=False), *root.named_buffers()]:
        targets.setdefault(canonical_name(name), []).append(tensor)
    relative = [[n[len(prefix) + 1:] if prefix else n for n in group
                 if not prefix or n.startswith(prefix + ".")] for group in tied]
    for group in relative:
        members = [t for n in group for t in targets.get(canonical_name(n), [])]
        for name in group:
            targets[canonical_name(name)] = members
    delta_ids = delta_parameter_ids(root)
    engine = detect_engine(backbone)
    filled: set[int] = set()
    for key, source in _iter_checkpoint(weights):
        for target in targets.get(canonical_name(key), []):
            if id(target) not in filled:
                engine.load(target, source)
                filled.add(id(target))
    missing = sorted(
        n for n, p in root.named_parameters() if id(p) not in filled and id(p) not in delta_ids
    )
    if missing:
        raise CheckpointError(f"{weights} has no tensor for these backbone parameters: "
                              f"{', '.join(missing[:20])}. Check weights_prefix.")


def _nearest_config(backbone: nn.Module, owner: str) -> Any:
    """The ``config`` of ``owner`` or of its closest ancestor that has one (transformers style)."""
    parts = owner.split(".") if owner else []
    for end in range(len(parts), -1, -1):
        config = getattr(backbone.get_submodule(".".join(parts[:end])), "config", None)
        if config is not None:
            return config
    return None


def _recompute_buffers(backbone: nn.Module, owners: dict[str, tuple[type, Any]],
                       device: torch.device) -> None:
    """Recompute buffers that were built on meta (rotary ``inv_freq``, ``position_ids``...).

    Each owning module is rebuilt on the CPU from its ``config`` (transformers modules take it as
    their first argument) and its buffers copied over; checkpoint values, loaded afterwards, win.
    """
    for owner, (module_type, config) in sorted(owners.items()):
        module = backbone.get_submodule(owner)
        if config is None:
            raise EngineError(
                f"{owner or 'the root'} ({module_type.__name__}) has buffers that only its "
                "constructor can compute and no config to rebuild it from. Build that module "
                "outside torch.device('meta') or register its buffers as persistent."
            )
        rebuilt = module_type(config)
        for name, buffer in rebuilt.named_buffers(recurse=False):
            getattr(module, name).copy_(buffer.to(device))


def _check_nothing_on_meta(backbone: nn.Module) -> None:
    left = [n for n, t in [*backbone.named_parameters(), *backbone.named_buffers()] if t.is_meta]
    if left:
        raise EngineError(f"Still on the meta device after setup: {', '.join(left[:20])}.")
