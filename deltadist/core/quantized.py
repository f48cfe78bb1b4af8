"""4-bit backbone weights (QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

A quantized weight stays the site's own ``weight`` parameter under its own name: torchao's
``NF4Tensor`` (a tensor subclass that ``F.linear`` dequantizes block by block, forward and
backward) replaces the values of an ``nn.Linear``'s weight, so the layer, its state-dict keys and
every hook on it stay as they were, and deltas attach on top exactly as on a full-precision layer.
bitsandbytes' ``Linear4bit`` layers (``Params4bit`` weights, stored packed) are recognised too:
deltas attach by their ``in_features`` / ``out_features``.

NF4 (4-bit NormalFloat) stores one 4-bit code per value, an 8-bit scaler per block of
:data:`BLOCK_SIZE` values and one float32 factor per block of scalers ("double quantization"):
4.127 bits per parameter. ``in_features`` must be a multiple of :data:`BLOCK_SIZE` (other linear
layers stay in full precision); FSDP2 shards rows, so each rank's rows must hold whole blocks of
scalers (:func:`nf4_layout`).

torchao and bitsandbytes are optional: nothing here imports them until a weight is quantized, and
a tensor is only recognised as quantized if its library is already loaded (it must be, for the
tensor to exist).
"""

from __future__ import annotations

import importlib
import math
from typing import Iterable

import torch
from torch import nn

from deltadist.addressing.common import modules_with_role
from deltadist.addressing.names import canonical_name
from deltadist.addressing.structures import TASK_HEAD
from deltadist.core.attach import delta_modules
from deltadist.engines import Engine, detect_engine
from deltadist.engines.storage import NF4_MODULE, is_quantized_tensor, plain_values, quantized_types
from deltadist.errors import ConfigError, DeltaError

SCHEMES = ("nf4",)
"""Names of the quantization schemes :func:`quantize_backbone` knows."""
BLOCK_SIZE = 64
"""Values per NF4 scaler (QLoRA's block size)."""
NF4_PARTS = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean")
"""The tensors an ``NF4Tensor`` stores (codes, scalers, factors of the scalers, their mean)."""
SCALER_BLOCK_SIZE = 256
"""Scalers per float32 factor at most (QLoRA's block size of the double quantization)."""


def _torchao_nf4():
    try:
        return importlib.import_module(NF4_MODULE)
    except ImportError as err:
        raise ImportError("NF4 backbones need torchao: pip install 'deltadist[quantize]' "
                          "(torchao>=0.18 beside torch).") from err


def is_quantized(tensor: torch.Tensor, engine: Engine | None = None) -> bool:
    """Whether ``tensor`` holds quantized values (a sharded one: the piece ``engine`` stores)."""
    return is_quantized_tensor(engine.stored(tensor) if engine else tensor)


def nf4_layout(shape: torch.Size | tuple[int, ...]) -> tuple[int, int] | None:
    """``(block_size, scaler_block_size)`` for a ``[out, in]`` weight, or ``None`` if its rows do
    not split into whole blocks (``in`` not a multiple of :data:`BLOCK_SIZE`).

    QLoRA's (and torchao's default) 256 scalers per factor wherever the weight has a multiple of
    256 blocks (16,384 values: every layer of a real model), which torchao's ``deepcopy`` of an
    NF4 tensor assumes; a smaller power of two for smaller weights.
    """
    if len(shape) != 2 or shape[1] % BLOCK_SIZE:
        return None
    return BLOCK_SIZE, math.gcd(SCALER_BLOCK_SIZE, shape[0] * shape[1] // BLOCK_SIZE)


def to_nf4(weight: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """``weight: [out, in]`` as an ``NF4Tensor`` (the block sizes of ``like``, an NF4 placeholder,
    if given); works on ``meta`` too (a placeholder of the right layout)."""
    nf4 = _torchao_nf4()
    if like is not None:
        return nf4.to_nf4(weight, like.block_size, like.scaler_block_size)
    layout = nf4_layout(weight.shape)
    if layout is None:
        raise ConfigError(f"a weight of shape {tuple(weight.shape)} cannot be stored as NF4: its rows "
                          f"must be a multiple of {BLOCK_SIZE} values.")
    return nf4.to_nf4(weight, *layout)


def quantizable_linears(backbone: nn.Module, skip: Iterable[nn.Module] = ()) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of ``backbone`` :func:`quantize_backbone` stores as NF4: not the
    output embeddings nor a task head (the layers that produce the logits, which QLoRA keeps in
    full precision and a delta may train a copy of), not the modules in ``skip``, not deltadist's
    own, not ``in`` sizes NF4 cannot block."""
    skipped = {id(m) for m in skip}
    head = backbone.get_output_embeddings() if hasattr(backbone, "get_output_embeddings") else None
    skipped.add(id(head))
    heads = set(modules_with_role(backbone, TASK_HEAD, guess=False))  # trained: a delta copies them
    for delta in delta_modules(backbone).values():
        skipped.update(id(m) for m in delta.modules())
    return {
        name: module for name, module in backbone.named_modules()
        if isinstance(module, nn.Linear) and id(module) not in skipped
        and not any(canonical_name(name) == h or canonical_name(name).startswith(h + ".") for h in heads)
        and not is_quantized(module.weight) and nf4_layout(module.weight.shape) is not None
    }


def quantize_backbone(backbone: nn.Module, scheme: str = "nf4", skip: Iterable[nn.Module] = ()) -> list[str]:
    """Store the weights of ``backbone``'s linear layers (:func:`quantizable_linears`) as NF4,
    in place, one at a time (the full-precision copy of each is freed as the next is made); on a
    model built on ``meta`` this lays out placeholders that loading fills.

    Returns:
        The names of the layers quantized.

    Raises:
        ConfigError: ``scheme`` is not one of :data:`SCHEMES`.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"quantize: unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}.")
    names = []
    for name, module in quantizable_linears(backbone, skip).items():
        weight = to_nf4(module.weight.detach())
        module.weight = nn.Parameter(weight, requires_grad=False)
        names.append(name)
    return names


def dequantize_backbone(backbone: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Store every NF4 weight of ``backbone`` as a plain parameter again (``dtype``: the dtype
    it was quantized from), in place, one at a time.

    Raises:
        DeltaError: a weight is bitsandbytes' (its layer class holds the packing: load the
            checkpoint without quantization instead) or sharded.
    """
    names = []
    engine = detect_engine(backbone)
    for name, module in backbone.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or not is_quantized(weight, engine):
            continue
        if not isinstance(weight, _torchao_nf4().NF4Tensor):
            raise DeltaError(
                f"{name}.weight is a sharded or bitsandbytes 4-bit weight, which cannot be dequantized "
                "in place: load the full-precision checkpoint in one process, attach the saved delta "
                "(from_finetuned) and merge there.")
        module.weight = nn.Parameter(plain_values(weight, dtype), requires_grad=weight.requires_grad)
        names.append(name)
    return names


def storage_bits(model: nn.Module) -> tuple[int, int]:
    """``(bits stored, parameters)`` of what this rank stores of ``model``'s parameters: their
    ratio is the bits per parameter (16 in bf16, ~4.13 for an NF4 weight)."""
    bits = values = 0
    engine = detect_engine(model)
    for param in model.parameters():
        local = engine.stored(param)
        values += local.numel()
        if isinstance(local, quantized_types()) and hasattr(local, "quantized_data"):  # NF4's parts
            parts = [getattr(local, n) for n in NF4_PARTS]
            bits += sum(part.numel() * part.element_size() * 8 for part in parts)
        else:
            bits += local.numel() * local.element_size() * 8
    return bits, values
