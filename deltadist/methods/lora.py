"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) and its variants as config fields.

``y = W x + s * B A dropout(x)`` with ``A: [r, in]`` (Kaiming-uniform) and ``B: [out, r]``
(zeros), so a fresh LoRA leaves the model's outputs unchanged; ``s = alpha / r``, or
``alpha / sqrt(r)`` with ``use_rslora`` (Kalajdzievski 2023). Like OpenDelta, the update is a
parallel branch next to the frozen linear layer, never a replacement of it: the backbone's own
modules and state-dict keys stay as they were.

``use_dora`` (DoRA, Liu et al. 2024, https://arxiv.org/abs/2402.09353) adds a learned magnitude
``m: [out]`` per output row: ``y = (m / ||W + s B A||) * (W + s B A) x + b``, the row norms
treated as constants in backward (the paper's section 4.3, as PEFT does). The branch adds
``(m / n - 1) * W x + (m / n) * s * B A x`` to the site's output, reusing the site's own ``W x``;
``n`` is computed from ``W``, ``A`` and ``B`` without forming ``W + s B A`` (see
:meth:`LoRA.row_norms`).

``init_lora_weights="pissa"`` (Meng et al. 2024, https://arxiv.org/abs/2404.02948) and ``"olora"``
(Büyükakyüz 2024, https://arxiv.org/abs/2406.01775) start ``A`` and ``B`` from the principal
singular vectors (an SVD) or a QR factorisation of ``W``. PEFT then subtracts ``s B0 A0`` from the
base weight in place; deltadist never writes into the backbone, so the branch keeps its initial
pair frozen (``initial_A``, ``initial_B``, saved with the delta) and computes
``s (B A - B0 A0) x``: the same function as PEFT's residual model plus its LoRA, and ``detach()``
still leaves the backbone as it was. Exported to PEFT it becomes the plain LoRA of rank ``2r``
PEFT's own conversion writes (``[A; A0]``, ``[B, -B0]``), which loads onto the unchanged base model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from deltadist.addressing.facts import weight_is_transposed
from deltadist.addressing.select import Site
from deltadist.api.delta_base import DeltaBase
from deltadist.core.config import DeltaConfig, check_choice, check_positive_int, check_range
from deltadist.core.delta_module import DeltaModule
from deltadist.core.mechanism import Mechanism
from deltadist.core.registry import register_method
from deltadist.core.shapes import linear_features, site_placement
from deltadist.engines import Engine
from deltadist.engines.storage import plain_values
from deltadist.errors import ConfigError, DeltaError, SiteError
from deltadist.mechanisms.hooks import PARALLEL
from deltadist.mechanisms.offsets import OFFSET
from deltadist.methods.lora_experts import build_expert_lora, parameter_targets


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
    use_rslora: bool = False
    """rsLoRA: scale the update by ``lora_alpha / sqrt(lora_r)`` (PEFT's ``use_rslora``)."""
    use_dora: bool = False
    """DoRA: a learned magnitude per output row (PEFT's ``use_dora``)."""
    init_lora_weights: bool | str = True
    """``True``: ``A`` Kaiming-uniform, ``B`` zero (the update starts at zero); ``"gaussian"``:
    ``A ~ N(0, 1/r)``, ``B`` zero; ``"pissa"`` (``"pissa_niter_<n>"``: a randomized SVD of ``n``
    iterations) and ``"olora"``: from ``W``'s principal components / QR factors (see the module
    docstring); ``False``: both random, as ``nn.Linear`` (the update does not start at zero: for
    tests). PEFT's ``init_lora_weights``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "lora_r")
        check_range(self, "lora_alpha", 1e-12, math.inf)
        check_range(self, "lora_dropout", 0.0, 1.0)
        if isinstance(self.init_lora_weights, str) and not PISSA_NITER.fullmatch(self.init_lora_weights):
            check_choice(self, "init_lora_weights", INITIALIZATIONS)
        if self.use_dora and from_weights(self.init_lora_weights):
            raise ConfigError(f"init_lora_weights={self.init_lora_weights!r} with use_dora is not supported: "
                              "choose one of them.")

    @property
    def scaling(self) -> float:
        """The factor of ``B A``."""
        return self.lora_alpha / (math.sqrt(self.lora_r) if self.use_rslora else self.lora_r)


INITIALIZATIONS = ("gaussian", "pissa", "olora")
"""The named values of ``init_lora_weights`` (besides ``True``, ``False`` and ``pissa_niter_<n>``)."""
PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")


def from_weights(init: bool | str) -> bool:
    """Whether ``init`` starts ``A`` and ``B`` from the site's weight (PiSSA, OLoRA)."""
    return isinstance(init, str) and (init in ("pissa", "olora") or PISSA_NITER.fullmatch(init) is not None)


class LoRA(DeltaModule):
    """The low-rank branch for one linear site: ``[..., in] -> [..., out]``; with ``dora``, also
    the magnitude ``[out]`` of each output row (PEFT's ``lora_magnitude_vector``)."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float,
                 init: bool | str = True, dora: bool = False, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.magnitude = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if dora else None
        # PiSSA / OLoRA: the frozen starting pair, subtracted so that the branch starts at zero.
        paired = from_weights(init)
        self.initial_A = nn.Parameter(torch.empty_like(self.lora_A), requires_grad=False) if paired else None
        self.initial_B = nn.Parameter(torch.empty_like(self.lora_B), requires_grad=False) if paired else None
        self.dropout = dropout  # functional: no extra module per site (attach speed on big models)
        self.scaling = scaling
        self.init = init
        self.merged_norms: torch.Tensor | None = None
        """DoRA while merged: the row norms the merge divided by (unmerging needs them: the merged
        weight's own rows all have norm ``m``)."""
        self.initialize()

    @property
    def reads_site_output(self) -> bool:
        """DoRA rescales the site's own output ``W x``, so its mechanism hands it over."""
        return self.magnitude is not None

    def reset_parameters(self) -> None:
        # A as nn.Linear initialises its weight, B at zero: the branch starts as an exact no-op.
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.lora_A.shape[0])
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if self.init is False:  # nn.Linear(r, out)'s own initialisation: a non-zero update
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)
        if self.magnitude is not None:
            # A placeholder: the delta sets the site's row norms (set_magnitude) once its weights are real.
            nn.init.ones_(self.magnitude)
        if self.initial_A is not None:  # placeholders until take_components reads the weight
            with torch.no_grad():
                self.initial_A.copy_(self.lora_A)
                self.initial_B.copy_(self.lora_B)

    def fixed_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.initial_A, self.initial_B) if p is not None]

    def take_components(self, site: nn.Module, engine: Engine) -> None:
        """PiSSA / OLoRA: ``A``, ``B`` (and their frozen starting copies) from the site's weight,
        gathered whole for this site only, factorised in float32 as PEFT does (a contiguous copy:
        LAPACK's last bits may depend on the memory layout)."""
        weight = _oriented(site, engine.gather({"w": site.weight})["w"]).float().contiguous()  # [out, in]
        r = engine.logical_shape(self.lora_A)[0]  # a sharded parameter's local piece may be flat
        if self.init == "olora":
            q, upper = torch.linalg.qr(weight)
            a, b = upper[:r], q[:, :r]
        else:
            niter = PISSA_NITER.fullmatch(self.init)
            if niter:
                u, values, v = torch.svd_lowrank(weight, q=r, niter=int(niter[1]))
                vh = v.t()
            else:
                u, values, vh = torch.linalg.svd(weight, full_matrices=False)
            root = (values[:r] / self.scaling).sqrt()  # s B A is the principal part itself
            a, b = root[:, None] * vh[:r], u[:, :r] * root[None]
        for name, value in (("lora_A", a), ("lora_B", b), ("initial_A", a), ("initial_B", b)):
            param = getattr(self, name)
            engine.scatter(param, value.contiguous().to(param.dtype))

    def set_magnitude(self, site: nn.Module, engine: Engine) -> None:
        """DoRA: ``m = ||W + s B A||`` per output row, so the branch starts where plain LoRA does."""
        full = engine.gather({"w": site.weight, "a": self.lora_A, "b": self.lora_B})
        norms = self.row_norms(_oriented(site, full["w"]), full["a"], full["b"])
        engine.scatter(self.magnitude, norms.to(self.magnitude.dtype))

    def row_norms(self, weight: torch.Tensor, a: torch.Tensor | None = None,
                  b: torch.Tensor | None = None) -> torch.Tensor:
        """``||W + s B A||`` of each output row, ``weight: [out, in]`` -> ``[out]`` (float32, no
        gradient), without forming the ``[out, in]`` sum: ``|W_i|^2 + 2 s (W A^T)_i . B_i +
        s^2 B_i (A A^T) B_i^T``, a ``[out, r]`` and an ``[r, r]`` product."""
        a = self.lora_A if a is None else a
        b = self.lora_B if b is None else b
        with torch.no_grad():
            w, a, b = weight.float(), a.float(), b.float()
            s = self.scaling
            squares = torch.linalg.vector_norm(w, dim=1).square()
            squares += 2 * s * ((w @ a.t()) * b).sum(1) + s * s * ((b @ (a @ a.t())) * b).sum(1)
            return squares.clamp_min(0).sqrt()

    def forward(self, hidden: torch.Tensor, site_output: torch.Tensor | None = None,
                site: nn.Module | None = None) -> torch.Tensor:
        """``hidden: [..., in]`` -> the update ``[..., out]`` in ``hidden``'s dtype. DoRA also
        takes the site's output ``[..., out]`` (bias included) and the site (its weight)."""
        x = hidden.to(self.lora_A.dtype)
        dropped = self.dropout and self.training
        if dropped:
            x = nn.functional.dropout(x, self.dropout, True)
        update = nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)
        if self.initial_A is not None:
            update = update - nn.functional.linear(nn.functional.linear(x, self.initial_A), self.initial_B)
        update = update * self.scaling
        if self.magnitude is None:
            return update.to(hidden.dtype)
        if site_output is None or site is None:
            raise DeltaError("a DoRA branch needs its site's output and weight; call it through its site.")
        weight = _oriented(site, plain_values(site.weight))  # a 4-bit weight: dequantized
        scale = self.magnitude / self.row_norms(weight).to(self.magnitude.dtype)  # [out]
        if dropped:  # the site saw x undropped: W on the dropped input, as PEFT does
            base = nn.functional.linear(x, weight.to(x.dtype))
        else:
            bias = getattr(site, "bias", None)
            base = site_output.to(x.dtype) - (bias.to(x.dtype) if isinstance(bias, torch.Tensor) else 0)
        return ((scale - 1) * base + scale * update).to(hidden.dtype)

    @property
    def groupable(self) -> bool:
        """Whether :meth:`grouped_update` may compute this branch with others (no dropout: each
        branch would draw its own mask; not DoRA, which rescales the site's output per branch, nor
        a branch with an initial pair)."""
        return not self.dropout and self.magnitude is None and self.initial_A is None

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

    def delta_weight(self, a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor | None = None,
                     b0: torch.Tensor | None = None) -> torch.Tensor:
        """``s (B A - B0 A0)`` in float32, ``[out, in]`` (the full tensors, gathered)."""
        product = b.float() @ a.float()
        if a0 is not None and b0 is not None:
            product -= b0.float() @ a0.float()
        return product * self.scaling

    def merge_blocker(self, site: nn.Module) -> str | None:
        weight = getattr(site, "weight", None)
        return None if isinstance(weight, torch.Tensor) else "the site has no weight to fold B A into"

    def fold_into(self, site: nn.Module, engine: Engine, sign: float) -> None:
        """``W += sign * s * B A`` (transposed for ``Conv1D``, whose weight is ``[in, out]``); DoRA
        merges to ``(m / n) * (W + s B A)`` and unmerges with the ``n`` it kept."""
        names = {"w": site.weight, "a": self.lora_A, "b": self.lora_B, "m": self.magnitude,
                 "a0": self.initial_A, "b0": self.initial_B}
        full = engine.gather({k: v for k, v in names.items() if v is not None})
        weight = _oriented(site, full["w"]).float()
        update = self.delta_weight(full["a"], full["b"], full.get("a0"), full.get("b0"))
        if self.magnitude is None:
            merged = weight + sign * update
        elif sign > 0:
            self.merged_norms = self.row_norms(weight, full["a"], full["b"])
            merged = (full["m"].float() / self.merged_norms)[:, None] * (weight + update)
        else:
            if self.merged_norms is None:
                raise DeltaError("this DoRA branch was not merged here, so its row norms are unknown; "
                                 "unmerge in the process that merged.")
            merged = weight * (self.merged_norms / full["m"].float())[:, None] - update
            self.merged_norms = None
        engine.scatter(site.weight, _oriented(site, merged).to(full["w"].dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scaling={self.scaling:g}, dropout={self.dropout:g}"


def _oriented(site: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The site's weight as ``[out, in]`` (``Conv1D`` keeps ``[in, out]``; its own inverse)."""
    return weight.t() if weight_is_transposed(site) else weight


@register_method
class LoraModel(DeltaBase):
    """Add LoRA branches to linear layers (``nn.Linear``, transformers ``Conv1D``, linear-like).

    ``merge()`` folds ``B A`` into the weights, ``merge_and_unload()`` returns the plain model.

    Args:
        backbone_model: the model to modify in place.
        lora_r: rank (default 8). lora_alpha: scale numerator (default 16).
        lora_dropout: dropout on the branch input (default 0).
        use_rslora, use_dora, init_lora_weights: the variants (see :class:`LoraConfig`).
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
    parameter_sites = True
    child_name = "lora"
    config: LoraConfig

    def _targets(self, site: Site) -> list[Site]:
        return parameter_targets(site, self.engine)  # fused experts: their 3-D parameters

    def _mechanism_for(self, target: Site) -> Mechanism:
        return OFFSET if target.parameter is not None else super()._mechanism_for(target)

    def _build_delta(self, site: Site) -> DeltaModule:
        if site.parameter is not None:  # fused experts, a router's weight: see lora_experts
            return build_expert_lora(site, self.config, self.engine)
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
        return LoRA(*features, r=cfg.lora_r, scaling=cfg.scaling, dropout=cfg.lora_dropout,
                    init=cfg.init_lora_weights, dora=cfg.use_dora, device=device, dtype=dtype)

    def _loadable(self, stored: DeltaConfig, tensors: dict[str, torch.Tensor],
                  hotswap: bool) -> dict[str, torch.Tensor]:
        """The tensors as loaded (another scale is refused: it would compute another function), or
        hot-swapped: another LoRA's in this one's shapes and scale, ``A`` (and ``initial_A``) padded
        with zero rows up to this rank, ``B`` (and ``initial_B``) with zero columns and multiplied
        by the ratio of the scales, so ``s_mine * B' A' == s_theirs * B A`` and the scale a compiled
        graph was specialised on stays."""
        stored = cast(LoraConfig, stored)  # the checkpoint's delta_type was checked: a LoRA
        mine = self.config
        if not hotswap:
            if not math.isclose(stored.scaling, mine.scaling, rel_tol=1e-6):
                raise ConfigError(f"The checkpoint's LoRA scales B A by {stored.scaling:g}, this one by "
                                  f"{mine.scaling:g} (lora_alpha, lora_r, use_rslora): attach with its "
                                  "values, or load it with hotswap=True (the scale folded into B).")
            return tensors
        different = [name for name, a, b in (
            ("use_dora", stored.use_dora, mine.use_dora),
            ("a PiSSA / OLoRA starting pair", from_weights(stored.init_lora_weights),
             from_weights(mine.init_lora_weights))) if a != b]
        if different:
            raise ConfigError("hotswap=True needs the same kind of LoRA; these differ: "
                              f"{', '.join(different)}.")
        if stored.lora_r > mine.lora_r:
            raise ConfigError(f"hotswap=True pads ranks up to this delta's lora_r={mine.lora_r}, and the "
                              f"checkpoint has lora_r={stored.lora_r}; attach with the largest rank to swap "
                              "in.")
        extra, ratio = mine.lora_r - stored.lora_r, stored.scaling / mine.scaling
        swapped = {}
        for key, value in tensors.items():
            part = key.rpartition(".")[2]
            if part in ("lora_A", "initial_A"):
                value = nn.functional.pad(value, (0, 0, 0, extra))
            elif part in ("lora_B", "initial_B"):
                value = nn.functional.pad(value.float() * ratio, (0, extra)).to(value.dtype)
            swapped[key] = value
        return swapped

    def _initialize_from_backbone(self) -> None:
        """Values read from each site's (logical, gathered) weight once it is real, one site at a
        time: PiSSA / OLoRA factors, DoRA magnitudes."""
        config = self.config
        if not (config.use_dora or from_weights(config.init_lora_weights)):
            return
        engine = self.engine
        for att in self.record.attachments:
            if not isinstance(att.delta, LoRA) or att.site.weight.is_meta:
                continue
            if from_weights(config.init_lora_weights):
                att.delta.take_components(att.site, engine)
            if config.use_dora:
                att.delta.set_magnitude(att.site, engine)
