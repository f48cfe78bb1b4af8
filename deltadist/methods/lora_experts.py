"""LoRA on a parameter rather than a linear layer: fused mixture-of-experts weights
(``experts.gate_up_proj: [experts, out, in]``, as transformers 5 builds Mixtral, Qwen2-MoE and
Qwen3-MoE) and routers' ``weight: [experts, hidden]``, PEFT's ``target_parameters``.

Each expert ``e`` gets its own pair, ``A: [experts, r, in]`` (Kaiming-uniform per expert) and
``B: [experts, out, r]`` (zeros), and the call reads ``W[e] + s B[e] A[e]``: one batched product,
put in place of the parameter for the duration of each call by the
:data:`~deltadist.mechanisms.offsets.OFFSET` mechanism. A 2-D parameter (a router) is one pair,
``A: [r, in]``, ``B: [out, r]``. An experts module whose weights are stored ``[experts, in, out]``
(``is_transposed``) gets ``(B A)^T``, as PEFT's ``ParamWrapper`` does. This is PEFT's math exactly
(its adapter files store ``A`` as ``[experts * r, in]`` and ``B`` as ``[out, r * experts]``,
expert-minor: see :mod:`deltadist.io.peft_export`).

Not with dropout (the input cannot be factored out of ``W + s B A``), DoRA or PiSSA / OLoRA; PEFT
refuses the same.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deltadist.addressing.linear import is_linear_module
from deltadist.addressing.select import Site
from deltadist.core.delta_module import DeltaModule
from deltadist.core.shapes import linear_features, site_placement
from deltadist.engines import Engine
from deltadist.errors import SiteError


class ExpertLoRA(DeltaModule):
    """``W + s B A`` for one 2-D or 3-D parameter ``W`` of its site (per expert when 3-D)."""

    reads_site_output = False

    def __init__(self, weight_shape: tuple[int, ...], parameter_name: str, r: int, scaling: float,
                 init: bool | str = True, transposed: bool = False, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        *experts, out_features, in_features = weight_shape
        if transposed:
            out_features, in_features = in_features, out_features
        self.lora_A = nn.Parameter(torch.empty(*experts, r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(*experts, out_features, r, device=device, dtype=dtype))
        self.parameter_name = parameter_name
        self.weight_shape = tuple(weight_shape)
        self.transposed = transposed
        self.scaling = scaling
        self.init = init
        self.initialize()

    def reset_parameters(self) -> None:
        # PEFT's ParamWrapper: A is nn.Linear(in, r * experts)'s weight (fan-in: in), B zeros;
        # with init False, B is nn.Linear(r * experts, out)'s (fan-in: r * experts).
        a, b = self.lora_A, self.lora_B
        if self.init == "gaussian":
            nn.init.normal_(a, std=1 / a.shape[-2])
        else:
            nn.init.kaiming_uniform_(a.view(-1, a.shape[-1]), a=math.sqrt(5))
        if self.init is False:
            nn.init.kaiming_uniform_(b.view(-1, b.shape[-1] * (b.numel() // (b.shape[-1] * b.shape[-2]))),
                                     a=math.sqrt(5))
        else:
            nn.init.zeros_(b)

    def delta_weight(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
        """``s B A`` per expert in the parameter's layout, ``weight_shape`` (``a``, ``b``:
        gathered copies; default: this module's own, with their gradient)."""
        a = self.lora_A if a is None else a
        b = self.lora_B if b is None else b
        update = torch.matmul(b, a) * self.scaling  # [experts, out, in], batched over experts
        return update.transpose(-1, -2) if self.transposed else update

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The parameter as the call should read it: ``weight + s B A`` in ``weight``'s dtype."""
        return weight + self.delta_weight().to(weight.dtype)

    def merge_blocker(self, site: nn.Module) -> str | None:
        return None if isinstance(site._parameters.get(self.parameter_name), torch.Tensor) else (
            f"the site has no parameter {self.parameter_name!r}")

    def fold_into(self, site: nn.Module, engine: Engine, sign: float) -> None:
        """``W += sign * s B A``, gathered and scattered through the engine."""
        param = site._parameters[self.parameter_name]
        full = engine.gather({"w": param, "a": self.lora_A, "b": self.lora_B})
        update = self.delta_weight(full["a"].float(), full["b"].float())
        engine.scatter(param, (full["w"].float() + sign * update).to(full["w"].dtype))

    def extra_repr(self) -> str:
        return (f"{self.parameter_name}: {list(self.weight_shape)}, r={self.lora_A.shape[-2]}, "
                f"scaling={self.scaling:g}")


def parameter_targets(site: Site, engine: Engine) -> list[Site]:
    """A selected module that is not a linear layer but holds fused expert weights (3-D
    parameters of its own) stands for them: LoRA on ``mlp.experts`` is LoRA on its
    ``gate_up_proj`` and ``down_proj``; a leaf module holding one 2-D ``weight`` and called like a
    linear layer inside its own forward but not linear-like itself (transformers 5's routers,
    ``mlp.gate``, return logits, weights and indices) for that weight; any other site stands for
    itself (a linear-like module keeps ordinary LoRA)."""
    module = site.module
    if site.parameter is not None or is_linear_module(module) or isinstance(module, nn.Embedding):
        return [site]
    own = {n: p for n, p in module._parameters.items() if isinstance(p, torch.Tensor)}
    fused = [n for n, p in own.items() if p.dim() == 3]
    if (not fused and list(own) == ["weight"] and own["weight"].dim() == 2 and not module._modules
            and linear_features(module, engine) is None):
        fused = ["weight"]
    return [Site(f"{site.name}.{n}", module, parameter=n) for n in fused] or [site]


def build_expert_lora(site: Site, config: object, engine: Engine) -> ExpertLoRA:
    """LoRA for the parameter site ``site``; what PEFT's ``ParamWrapper`` also refuses is refused."""
    name = site.parameter or ""
    param = site.module._parameters.get(name)
    shape = tuple(engine.logical_shape(param)) if isinstance(param, torch.Tensor) else ()
    problems = [what for what, bad in (
        (f"a {len(shape)}-D parameter (LoRA on parameters needs a 2-D weight or 3-D stacked experts)",
         len(shape) not in (2, 3)),
        ("lora_dropout (the input cannot be factored out of W + s B A)", config.lora_dropout),
        ("use_dora", config.use_dora),
        (f"init_lora_weights={config.init_lora_weights!r}", isinstance(config.init_lora_weights, str)
         and config.init_lora_weights != "gaussian"),
    ) if bad]
    if problems:
        raise SiteError(f"LoRA on the parameter {site.name!r} cannot have: {'; '.join(problems)}.")
    device, dtype = site_placement(site.module, config.delta_dtype)
    return ExpertLoRA(shape, name, r=config.lora_r, scaling=config.scaling, init=config.init_lora_weights,
                      transposed=bool(getattr(site.module, "is_transposed", False)) and len(shape) == 3,
                      device=device, dtype=dtype)
