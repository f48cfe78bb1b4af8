"""The meta-device setup order for a sharded run, in one function (:func:`prepare_model`).

The order for a sharded run (torchtune's, made a function so no script copies it)::

    build backbone on meta -> attach deltas (meta) -> freeze -> wrap/shard -> materialise
    -> load base weights -> initialise deltas -> recompute buffers -> check nothing is on meta

DDP is the exception: it copies rank 0's values at construction, so it wraps last.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from deltadist.api.auto import AutoDeltaModel
from deltadist.core.quantized import quantize_backbone
from deltadist.core.record import delta_key
from deltadist.engines import engine_class, wrap_model
from deltadist.engines.base import on_meta
from deltadist.errors import EngineError
from deltadist.io.backbone_weights import (
    check_nothing_on_meta,
    load_weights,
    meta_buffer_owners,
    recompute_buffers,
    retie,
    tied_parameters,
)


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
                  device: torch.device | str = "cpu", delta_seed: int = 0,
                  quantize: str | None = None) -> PreparedModel:
    """Build a backbone on ``meta``, attach and freeze a delta, shard, and fill in real values.

    Args:
        build_backbone: makes the backbone (called under ``torch.device("meta")``: instant).
        delta_config: a delta config or its dict (``{"delta_type": "lora", ...}``).
        engine: an engine name (:data:`deltadist.engines.ENGINES`): ``plain``, ``ddp``, ``fsdp2``, ``fsdp1``.
        weights: a transformers checkpoint directory (``model.safetensors`` or a sharded index).
            Tensors are memory-mapped and read one at a time; under FSDP2 each rank reads only
            the rows of its own shard.
        weights_prefix: submodule of the backbone that the checkpoint's keys are relative to.
        device: where parameters live (``cuda:<local rank>`` on GPUs).
        delta_seed: seed of the delta initialisation (the same on every rank and engine, so a
            sharded run starts exactly where a single-process one does).
        quantize: ``"nf4"`` stores the frozen linear weights in 4 bits (QLoRA,
            :func:`~deltadist.core.quantized.quantize_backbone`), quantized as they are read: the
            full-precision model never exists; FSDP2 shards the 4-bit weights.

    Raises:
        CheckpointError: the weights are missing a backbone tensor (listed) or do not fit.
        EngineError: something is still on ``meta`` at the end (named).
    """
    device = torch.device(device)
    problem = engine_class(engine).quantized_weights_problem
    if quantize is not None and problem is not None:
        raise EngineError(f"quantize={quantize!r} does not work with engine {engine!r}: {problem}.")
    sharded = engine_class(engine).shards_parameters  # else the engine wraps a loaded model (DDP)
    with torch.device("meta"):
        backbone = build_backbone()
    delta = AutoDeltaModel.from_config(delta_config, backbone_model=backbone)
    delta.freeze_module()
    if quantize is not None:  # NF4 placeholders on meta, filled as the checkpoint is read
        trained = [m for m in backbone.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        quantize_backbone(backbone, quantize, skip=trained)
    initial = _initial_delta_values(delta, delta_seed)
    # Classes are noted before wrapping: fully_shard swaps the class of the modules it shards.
    buffer_owners = meta_buffer_owners(backbone)
    tied = tied_parameters(backbone)
    model = wrap_model(backbone, engine, device) if sharded else backbone
    if on_meta(backbone):
        backbone.to_empty(device=device)
        if not sharded:
            retie(backbone, tied)
    recompute_buffers(backbone, buffer_owners, device)
    load_weights(backbone, weights, weights_prefix, tied)
    for name, param in delta.delta_parameters().items():
        delta.engine.scatter(param, initial[name])
    delta._copy_loaded_modules()  # each trained copy (a task head) starts as the loaded module
    delta._initialize_from_backbone()  # e.g. a soft prompt copied from the loaded embeddings
    check_nothing_on_meta(backbone)
    if not sharded:  # DDP copies rank 0's values when it is built: the loaded ones
        model = wrap_model(backbone, engine, device)
    return PreparedModel(model=model, backbone=backbone, delta=delta)


def _initial_delta_values(delta: Any, seed: int) -> dict[str, torch.Tensor]:
    """Initial values of every delta parameter, computed on CPU twins under ``seed``.

    Twins are initialised in attach order, as a delta built on real weights is, so both paths
    start from the same values when seeded alike.
    """
    values: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for att in delta.record.attachments:
            if att.mechanism.copies_backbone:
                continue  # a trained copy starts as its loaded module
            twin = copy.deepcopy(att.delta).to_empty(device="cpu")
            twin.reset_parameters()
            for name, param in twin.named_parameters():
                values[delta_key(att.site_name, att.base_name, name)] = param.detach()
    return values
