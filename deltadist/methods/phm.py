"""Parameterised hypercomplex multiplication (PHM) layers, Compacter's projections.

A PHM layer (Zhang et al. 2021, https://arxiv.org/abs/2102.08597; Compacter, Karimi Mahabadi et
al. 2021, https://arxiv.org/abs/2106.04647) has the weight

    W = sum_i  A_i (x) B_i        A: [n, n, n] (the "rule"), B: [n, in/n, out/n], W: [in, out]

(``(x)`` the Kronecker product), optionally with ``B_i = s_i t_i`` of rank ``r`` (``factorized_phm``)
and ``A_i = a_i b_i`` of rank one (``factorized_phm_rule``). The rule and the weights are separate
modules whose ``forward()`` returns the tensor, so that one rule (or one pair of weights) can be
shared by every site: it lives once, in a holder delta at the model root, and each layer *calls*
it -- which is what lets ZeRO-3 gather it at the moment it is used, and FSDP shard it once.
"""

from __future__ import annotations

import torch
from torch import nn

from deltadist.methods.bottleneck import glorot_


class PHMRule(nn.Module):
    """The rule ``A: [n, n, n]``, full or as ``left @ right`` (``[n, n, 1] @ [n, 1, n]``).

    ``learned=False`` (Compacter's ``learn_phm=False``) keeps it at its initial values: its
    parameters are :attr:`~deltadist.core.delta_module.DeltaModule.fixed` -- saved, never trained.
    """

    def __init__(self, n: int, factorized: bool, init: str, init_range: float, learned: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.init, self.init_range, self.learned = init, init_range, learned
        shapes = [(n, n, 1), (n, 1, n)] if factorized else [(n, n, n)]
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty(s, device=device, dtype=dtype), requires_grad=learned)
             for s in shapes]
        )

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for factor in self.factors:
                if self.init == "uniform":
                    factor.uniform_(-1.0, 1.0)
                else:
                    factor.normal_(0.0, self.init_range)

    def forward(self) -> torch.Tensor:
        """The rule, ``[n, n, n]``."""
        return self.factors[0] if len(self.factors) == 1 else self.factors[0] @ self.factors[1]


class PHMWeight(nn.Module):
    """The weights ``B: [n, in/n, out/n]``, full or as ``left @ right`` of rank ``rank``."""

    def __init__(self, n: int, in_features: int, out_features: int, factorized: bool, rank: int,
                 init: str, init_range: float, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.init, self.init_range = init, init_range
        p, q = in_features // n, out_features // n
        shapes = [(n, p, rank), (n, rank, q)] if factorized else [(n, p, q)]
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty(s, device=device, dtype=dtype)) for s in shapes]
        )

    def reset_parameters(self) -> None:
        for factor in self.factors:
            if self.init == "normal":
                with torch.no_grad():
                    factor.normal_(0.0, self.init_range)
            else:
                glorot_(factor, self.init, (self.in_features, self.out_features))

    def forward(self) -> torch.Tensor:
        """The weights, ``[n, in/n, out/n]``."""
        return self.factors[0] if len(self.factors) == 1 else self.factors[0] @ self.factors[1]


class PHMLinear(nn.Module):
    """``x @ sum_i kron(A_i, B_i) + bias``: ``[..., in] -> [..., out]``.

    Args:
        rule, weight: the layer's own modules, or shared ones (held elsewhere, only referenced
            here: not registered as children, so they are saved and sharded once).
        kronecker_prod: ``True``: build ``W`` explicitly, then one matmul; ``False``: contract
            ``x`` with ``A`` and ``B`` directly (the same function); ``None``: whichever is cheaper
            for the call's shape (:func:`kronecker_is_cheaper`).
    """

    def __init__(self, in_features: int, out_features: int, rule: PHMRule, weight: PHMWeight,
                 own_rule: bool, own_weight: bool, kronecker_prod: bool | None, bias: bool,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kronecker_prod = in_features, out_features, kronecker_prod
        for name, module, own in (("rule", rule, own_rule), ("weight", weight, own_weight)):
            if own:
                self.add_module(name, module)
            else:
                object.__setattr__(self, name, module)  # a reference to the shared one
        self.own_rule, self.own_weight = own_rule, own_weight
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def reset_parameters(self) -> None:
        """Reset this layer's own parameters (shared ones belong to their holder)."""
        if self.own_rule:
            self.rule.reset_parameters()
        if self.own_weight:
            self.weight.reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [..., in]`` -> ``[..., out]``."""
        rule, weight = self.rule(), self.weight()  # called, so ZeRO-3 gathers shared ones here
        n, p, q = rule.shape[0], weight.shape[1], weight.shape[2]
        kronecker = self.kronecker_prod
        if kronecker is None:
            kronecker = kronecker_is_cheaper(x.numel() // max(self.in_features, 1), self.in_features)
        if kronecker:
            full = torch.einsum("iab,ipq->apbq", rule, weight).reshape(n * p, n * q)
            y = x @ full
        else:
            y = torch.einsum("...ap,ipq,iab->...bq", x.unflatten(-1, (n, p)), weight, rule).flatten(-2)
        return y + self.bias if self.bias is not None else y


def kronecker_is_cheaper(rows: int, in_features: int) -> bool:
    """Whether building ``W`` (``n * in * out`` products, then one ``[rows, in] @ [in, out]``)
    beats contracting ``x`` with the factors for ``rows`` input rows.

    Both paths cost about ``rows * in * out``; building ``W`` adds ``n * in * out`` once, which
    pays off unless the call has few rows for its width (decoding), while the three-way contraction
    pays for its intermediate ``[rows, n, n, out/n]`` on every call. Measured forward + backward on
    a 2-core CPU (n = 4, factorised weights): the contraction was 1.1-5x slower from
    ``rows >= in / 4`` on (5x for an up projection 256 -> 4096 at 512 rows), level near
    ``in / 32`` and up to 1.6x faster for single rows of a wide layer; ``in / 8`` splits them.
    """
    return rows * 8 >= in_features
