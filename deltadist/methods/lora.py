"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

``y = W x + (alpha / r) * B A dropout(x)`` with ``A: [r, in]`` (Kaiming-uniform) and ``B: [out, r]``
(zeros), so a fresh LoRA leaves the model's outputs unchanged. Like OpenDelta, the update is a
parallel branch next to the frozen linear layer, never a replacement of it: the backbone's own
modules and state-dict keys stay as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from deltadist.addressing.facts import weight_is_transposed
from deltadist.addressing.select import Site
from deltadist.api.delta_base import DeltaBase
from deltadist.core.config import DeltaConfig, check_positive_int, check_range
from deltadist.core.delta_module import DeltaModule
from deltadist.core.registry import register_method
from deltadist.core.shapes import linear_features, site_placement
from deltadist.engines import Engine
from deltadist.errors import SiteError
from deltadist.mechanisms.hooks import PARALLEL


@dataclass(kw_only=True)
class LoraConfig(DeltaConfig):
    """Config of :class:`LoraModel`."""

    delta_type = "lora"

    lora_r: int = 8
    """Rank of the update ``B A``."""
    lora_alpha: float = 16
    """Scale numerator: the update is multiplied by ``lora_alpha / lora_r``."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "lora_r")
        check_range(self, "lora_alpha", 1e-12, math.inf)
        check_range(self, "lora_dropout", 0.0, 1.0)


class LoRA(DeltaModule):
    """The low-rank branch for one linear site: ``[..., in] -> [..., out]``."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.dropout = dropout  # functional: no extra module per site (attach speed on big models)
        self.scaling = alpha / r
        self.initialize()

    def reset_parameters(self) -> None:
        # A as nn.Linear initialises its weight, B at zero: the branch starts as an exact no-op.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden: [..., in]`` -> ``[..., out]`` in ``hidden``'s dtype."""
        x = hidden.to(self.lora_A.dtype)
        if self.dropout:
            x = nn.functional.dropout(x, self.dropout, self.training)
        update = nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)
        return (update * self.scaling).to(hidden.dtype)

    @property
    def groupable(self) -> bool:
        """Whether :meth:`grouped_update` may compute this branch with others (no dropout: each
        branch would draw its own mask)."""
        return not self.dropout

    @staticmethod
    def grouped_update(hidden: torch.Tensor, members: list[tuple["LoRA", torch.Tensor]]) -> torch.Tensor:
        """The updates of several LoRA branches of one site, each on its own rows, in two batched
        products: row ``i`` uses the ``A`` and ``scaling * B`` of the branch that serves it (zeros
        for none), ranks padded with zeros to the largest. ``members``: ``(branch, rows)`` pairs
        with disjoint rows. Shapes: ``hidden [batch, ..., in]`` -> ``[batch, ..., out]``."""
        first = members[0][0]
        rank = max(branch.lora_A.shape[0] for branch, _ in members)
        zero_a = first.lora_A.new_zeros(rank, first.lora_A.shape[1])  # slot 0: rows no branch serves
        zero_b = first.lora_B.new_zeros(first.lora_B.shape[0], rank)
        a_of, b_of, scale_of = [zero_a], [zero_b], [0.0]
        for branch, _ in members:
            extra = rank - branch.lora_A.shape[0]  # pad only where ranks differ (padding copies)
            a_of.append(branch.lora_A if not extra else nn.functional.pad(branch.lora_A, (0, 0, 0, extra)))
            b_of.append(branch.lora_B if not extra else nn.functional.pad(branch.lora_B, (0, extra)))
            scale_of.append(branch.scaling)
        batch = hidden.shape[0]
        slots = [0] * batch
        for index, (_, rows) in enumerate(members, start=1):
            for row in rows.tolist():
                slots[row] = index
        # Each row's A and B stacked directly (one copy), and the scaling applied to the rank-wide
        # product rather than to a scaled copy of every B.
        a_rows = torch.stack([a_of[slot] for slot in slots])                    # [batch, rank, in]
        b_rows = torch.stack([b_of[slot] for slot in slots])                    # [batch, out, rank]
        x = hidden.to(first.lora_A.dtype).reshape(batch, -1, hidden.shape[-1])
        scale = torch.tensor([scale_of[slot] for slot in slots], dtype=x.dtype, device=x.device)
        low = torch.bmm(x, a_rows.transpose(1, 2)) * scale.view(batch, 1, 1)  # [batch, tokens, rank]
        update = torch.bmm(low, b_rows.transpose(1, 2))                         # [batch, tokens, out]
        return update.reshape(*hidden.shape[:-1], update.shape[-1]).to(hidden.dtype)

    def merge_blocker(self, site: nn.Module) -> str | None:
        weight = getattr(site, "weight", None)
        return None if isinstance(weight, torch.Tensor) else "the site has no weight to fold B A into"

    def fold_into(self, site: nn.Module, engine: Engine, sign: float) -> None:
        """``W += sign * (alpha / r) * B A`` (transposed for ``Conv1D``, whose weight is ``[in, out]``)."""
        full = engine.gather({"w": site.weight, "a": self.lora_A, "b": self.lora_B})
        update = (full["b"].float() @ full["a"].float()) * (self.scaling * sign)
        if weight_is_transposed(site):
            update = update.t()
        engine.scatter(site.weight, (full["w"].float() + update).to(full["w"].dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scaling={self.scaling:g}, dropout={self.dropout:g}"


@register_method
class LoraModel(DeltaBase):
    """Add LoRA branches to linear layers (``nn.Linear``, transformers ``Conv1D``, linear-like).

    ``merge()`` folds ``B A`` into the weights, ``merge_and_unload()`` returns the plain model.

    Args:
        backbone_model: the model to modify in place.
        lora_r: rank (default 8). lora_alpha: scale numerator (default 16).
        lora_dropout: dropout on the branch input (default 0).
        modified_modules: linear layers to modify (default: the ``attn.q`` and ``attn.v`` roles).
        exclude_modules, unfrozen_modules, common_structure: see :class:`DeltaConfig`.

    Example:
        >>> delta = LoraModel(model, modified_modules=["query", "value"], lora_r=4)  # doctest: +SKIP
        >>> delta.freeze_module()  # doctest: +SKIP
    """

    delta_type = "lora"
    config_class = LoraConfig
    default_modified_modules = ("attn.q", "attn.v")
    mechanism = PARALLEL
    child_name = "lora"
    config: LoraConfig

    def _build_delta(self, site: Site) -> DeltaModule:
        features = linear_features(site.module, self.engine)
        if features is None:
            linear_children = [
                f"{site.name}.{n}" for n, m in site.module.named_modules()
                if n and linear_features(m, self.engine) is not None
            ][:5]
            hint = f" Its linear sub-modules: {', '.join(linear_children)}." if linear_children else ""
            raise SiteError(
                f"LoRA needs a linear layer, but {site.name!r} is a {type(site.module).__name__}."
                f"{hint}"
            )
        device, dtype = site_placement(site.module, self.config.delta_dtype)
        cfg = self.config
        return LoRA(*features, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                    device=device, dtype=dtype)
