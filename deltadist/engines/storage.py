"""How a rank stores a parameter's values: plainly, or quantized (4-bit NF4, bitsandbytes 4-bit).

Engines read a parameter's values through :func:`plain_values` wherever they need numbers
(gathering, sampling), so a quantized backbone weight gathers, samples and merges like any other.
Nothing here imports torchao or bitsandbytes: a tensor is recognised as quantized only if its
library is already loaded, which it must be for the tensor to exist.
"""

from __future__ import annotations

import importlib
import sys

import torch

NF4_MODULE = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"
"""torchao's NF4 tensor module (imported by name: ``torchao.quantization.quantize_`` is also a
function, which shadows the package path in an ``import a.b.c`` statement)."""
BNB_MODULE = "bitsandbytes.nn.modules"


def quantized_types() -> tuple[type, ...]:
    """The quantized tensor classes of the libraries loaded so far."""
    types: list[type] = []
    if (nf4 := sys.modules.get(NF4_MODULE)) is not None:
        types.append(nf4.NF4Tensor)
    if (bnb := sys.modules.get(BNB_MODULE)) is not None:
        types.append(bnb.Params4bit)
    return tuple(types)


def is_quantized_tensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` itself (not a sharded wrapper of it) holds quantized values."""
    types = quantized_types()
    return bool(types) and isinstance(tensor, types)


def plain_values(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor``'s values as a plain tensor (``dtype``: the one it was quantized from); a plain
    tensor is returned as it is (or converted to ``dtype``)."""
    if not is_quantized_tensor(tensor):
        return tensor if dtype is None else tensor.to(dtype)
    bnb = sys.modules.get(BNB_MODULE)
    if bnb is not None and isinstance(tensor, bnb.Params4bit):
        functional = importlib.import_module("bitsandbytes.functional")
        plain = functional.dequantize_4bit(tensor.data, tensor.quant_state)
        return plain.to(dtype or tensor.quant_state.dtype)  # its own dtype is the packing's, uint8
    return tensor.get_original_weight().to(dtype or tensor.dtype)


def unknown_samples(flat_indices: torch.Tensor) -> torch.Tensor:
    """Fingerprint samples of a quantized tensor: NaN, "not known" (its values are not the
    checkpoint's, see :func:`deltadist.core.fingerprint.samples_agree`)."""
    return torch.full((len(flat_indices),), float("nan"), dtype=torch.float64)
