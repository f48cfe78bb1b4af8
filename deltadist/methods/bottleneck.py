"""What the adapter family shares: activations by name, projection layers, the bottleneck module.

An adapter's update is ``up(act(down(h)))`` (Houlsby et al. 2019,
https://arxiv.org/abs/1902.00751): ``down`` maps the site's width to a small bottleneck, ``up``
maps it back. The methods differ only in how ``down`` and ``up`` are parameterised -- a full
matrix (:class:`~torch.nn.Linear`), a low-rank product (:class:`LowRankLinear`), a sum of
Kronecker products (:class:`~deltadist.methods.phm.PHMLinear`) -- and in how the update joins the
site (after it, with a residual; beside it, scaled).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from deltadist.core.delta_module import DeltaModule

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu_new": lambda: nn.GELU(approximate="tanh"),  # GPT-2/BERT "gelu_new": the tanh approximation
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "linear": nn.Identity,
}
"""``non_linearity`` names (case-insensitive, as OpenDelta) and the module each builds."""

WEIGHT_INITS = ("glorot-uniform", "glorot-normal")
"""``low_rank_w_init`` / ``hypercomplex_nonlinearity`` values: Xavier uniform or normal."""


def glorot_(tensor: torch.Tensor, how: str, fan: tuple[int, int]) -> None:
    """Xavier-initialise ``tensor`` in place for a layer ``fan = (in, out)`` wide."""
    scale = math.sqrt(2.0 / (fan[0] + fan[1]))
    with torch.no_grad():
        if how == "glorot-normal":
            tensor.normal_(0.0, scale)
        else:
            tensor.uniform_(-math.sqrt(3.0) * scale, math.sqrt(3.0) * scale)


def unlearned_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``module``'s submodules marked ``learned = False`` (a Compacter rule with
    ``learn_phm=False``): saved with the delta, never trained."""
    return [p for m in module.modules() if getattr(m, "learned", True) is False for p in m.parameters()]


class LowRankLinear(nn.Module):
    """``x @ (left @ right) + bias``: a linear map whose ``[in, out]`` weight has rank ``rank``.

    OpenDelta multiplied ``left`` and ``right`` elementwise (a broadcast that is only their product
    at rank 1); this is the matrix product at every rank.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, init: str, start_at_zero: bool,
                 bias: bool = True, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.init, self.start_at_zero = init, start_at_zero
        self.left = nn.Parameter(torch.empty(in_features, rank, device=device, dtype=dtype))
        self.right = nn.Parameter(torch.empty(rank, out_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def reset_parameters(self) -> None:
        glorot_(self.left, self.init, (self.in_features, self.out_features))
        if self.start_at_zero:  # the up projection: the adapter starts as the identity
            nn.init.zeros_(self.right)
        else:
            glorot_(self.right, self.init, (self.in_features, self.out_features))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [..., in]`` -> ``[..., out]``."""
        y = (x @ self.left) @ self.right
        return y + self.bias if self.bias is not None else y


class Bottleneck(DeltaModule):
    """``up(act(down(h)))`` on ``[..., width_in] -> [..., width_out]``, optionally residual and scaled.

    Computed in the parameters' dtype and returned in ``h``'s (the backbone keeps its dtype).

    Args:
        down, up: the projections (``[..., in] -> [..., bottleneck] -> [..., out]``), each with a
            ``reset_parameters()`` that leaves ``up`` at (or near) zero.
        non_linearity: a key of :data:`ACTIVATIONS`.
        residual: return ``h + update`` (a sequential adapter) instead of the update alone.
        scale: multiplies the update (a parallel adapter's ``scaled``).
    """

    def __init__(self, down: nn.Module, up: nn.Module, non_linearity: str, residual: bool,
                 scale: float = 1.0) -> None:
        super().__init__()
        self.down, self.act, self.up = down, ACTIVATIONS[non_linearity.lower()](), up
        self.residual, self.scale = residual, scale
        self.initialize()

    def reset_parameters(self) -> None:
        for projection in (self.down, self.up):
            projection.reset_parameters()

    def fixed_parameters(self) -> list[nn.Parameter]:
        return unlearned_parameters(self)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden: [..., in]`` -> ``[..., out]`` in ``hidden``'s dtype."""
        x = hidden.to(self.param_dtype)
        update = self.up(self.act(self.down(x)))
        if self.scale != 1.0:
            update = update * self.scale
        update = update.to(hidden.dtype)
        return hidden + update if self.residual else update

    def extra_repr(self) -> str:
        return f"residual={self.residual}, scale={self.scale:g}"


class AdapterLinear(nn.Linear):
    """A full projection initialised as the adapter papers do: ``N(0, 0.01)``, zero bias.

    The up projection (``start_at_zero``) starts at zero, so a fresh adapter is exactly the
    identity (Houlsby et al.'s "near-identity initialisation", at its limit) and its first step
    still trains both projections, as LoRA's zero ``B`` does.
    """

    def __init__(self, in_features: int, out_features: int, start_at_zero: bool,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        # Not nn.Linear.__init__: it would draw an initialisation that the owner's initialize()
        # draws again, so a delta built on real weights would consume the RNG twice and not
        # match the same delta initialised after a meta-device setup (prepare_model).
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.start_at_zero = in_features, out_features, start_at_zero
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return  # values come later (materialise, then initialise)
        with torch.no_grad():
            if self.start_at_zero:
                self.weight.zero_()
            else:
                self.weight.normal_(0.0, 0.01)
            self.bias.zero_()
