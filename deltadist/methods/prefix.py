"""Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190): trained keys and values.

Every selected attention gets ``P = prefix_token_num`` key and value vectors per key/value head,
joined before the call's own keys and values (see :mod:`deltadist.mechanisms.attention`): encoder
self-attention, decoder self-attention and cross-attention alike, with the attention's own
key/value head count and head size (grouped-query models: ``num_key_value_heads`` heads of
``config.head_dim``).

With ``reparameterize`` (the paper's training setup) the prefixes come from an MLP:
``tanh(E W1 + b1) W2 + b2`` with ``E: [P, embed_dim]``. Its first layer (with ``E``) is shared by
every site and held once at the model root; its output layer is split by rows into one
``[mid_dim, 2 * kv_width]`` layer per site -- the same function as the paper's single output layer
``[mid_dim, layers * 2 * kv_width]``, without materialising the others' rows at each site.
``fold_reparameterization()`` replaces the MLP by the plain prefixes it computes, for inference
and export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltadist.addressing.common import common_name_index
from deltadist.addressing.facts import config_value
from deltadist.addressing.names import canonical_modules
from deltadist.addressing.select import Site
from deltadist.api.delta_base import DeltaBase
from deltadist.core import attach as mechanisms
from deltadist.core.attach import Attachment
from deltadist.core.config import DeltaConfig, check_positive_int
from deltadist.core.delta_module import DeltaModule
from deltadist.core.mechanism import HOLDER
from deltadist.core.registry import register_method
from deltadist.core.shapes import site_placement
from deltadist.errors import SiteError
from deltadist.mechanisms.attention import KEY_VALUE_PREFIX, routing_problem

NO_WEIGHT = ("a prefix adds keys and values that no weight of the model holds; "
             "fold_reparameterization() turns the MLP into plain prefixes for inference and export")
"""Why prefixes cannot be merged."""
SHARED_NAME = "prefix_shared"
"""Child name (and checkpoint key prefix) of the shared first layer of the reparameterisation."""


@dataclass(kw_only=True)
class PrefixConfig(DeltaConfig):
    """Config of :class:`PrefixModel` (OpenDelta's arguments and defaults)."""

    delta_type = "prefix"

    prefix_token_num: int = 6
    """``P``: prefix positions per attention."""
    reparameterize: bool = True
    """Produce the prefixes with an MLP (trained) instead of training them directly."""
    embed_dim: int = 512
    """Width of the MLP's input embeddings ``E: [P, embed_dim]``."""
    mid_dim: int = 512
    """Width of the MLP's hidden layer."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("prefix_token_num", "embed_dim", "mid_dim"):
            check_positive_int(self, name)


class PrefixShared(DeltaModule):
    """The shared first layer of the reparameterisation: ``[P, embed_dim] -> [P, mid_dim]``."""

    def __init__(self, tokens: int, embed_dim: int, mid_dim: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.wte = nn.Parameter(torch.empty(tokens, embed_dim, device=device, dtype=dtype))
        self.weight = nn.Parameter(torch.empty(mid_dim, embed_dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(mid_dim, device=device, dtype=dtype))
        self.initialize()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.wte, std=1.0)  # as nn.Embedding
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # as nn.Linear
        bound = self.weight.shape[1] ** -0.5
        nn.init.uniform_(self.bias, -bound, bound)

    def merge_blocker(self, site: nn.Module) -> str | None:
        return NO_WEIGHT

    def forward(self) -> torch.Tensor:
        """``[P, mid_dim]``."""
        return torch.tanh(nn.functional.linear(self.wte, self.weight, self.bias))


class Prefix(DeltaModule):
    """One attention's prefix: ``[P, kv_width]`` keys and values, plain or from the shared MLP."""

    joins_attention = True
    """Called by the attention wrapper (:mod:`deltadist.mechanisms.attention`) with the call's shape."""

    def __init__(self, tokens: int, kv_width: int, shared: PrefixShared | None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tokens, self.kv_width = tokens, kv_width
        # A reference, not a child: the holder at the root owns the shared layer (saved once);
        # it is called through __call__, so ZeRO-3 gathers it there.
        object.__setattr__(self, "shared", shared)
        if shared is None:
            self.key = nn.Parameter(torch.empty(tokens, kv_width, device=device, dtype=dtype))
            self.value = nn.Parameter(torch.empty(tokens, kv_width, device=device, dtype=dtype))
        else:
            mid = shared.weight.shape[0]
            self.out_weight = nn.Parameter(torch.empty(2 * kv_width, mid, device=device, dtype=dtype))
            self.out_bias = nn.Parameter(torch.empty(2 * kv_width, device=device, dtype=dtype))
        self.initialize()

    def merge_blocker(self, site: nn.Module) -> str | None:
        return NO_WEIGHT

    @property
    def reparameterized(self) -> bool:
        """Whether the prefixes come from the shared MLP (else they are trained directly)."""
        return self.shared is not None

    def reset_parameters(self) -> None:
        if self.reparameterized:
            nn.init.kaiming_uniform_(self.out_weight, a=5 ** 0.5)
            bound = self.out_weight.shape[1] ** -0.5
            nn.init.uniform_(self.out_bias, -bound, bound)
        else:
            nn.init.normal_(self.key, std=1.0)
            nn.init.normal_(self.value, std=1.0)

    def key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([P, kv_width], [P, kv_width])``."""
        if not self.reparameterized:
            return self.key, self.value
        both = nn.functional.linear(self.shared(), self.out_weight, self.out_bias)
        return both[:, :self.kv_width], both[:, self.kv_width:]

    def forward(self, batch: int, heads: int, head_dim: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``([batch, heads, P, head_dim], same)`` in ``dtype``."""
        if heads * head_dim != self.kv_width:
            raise SiteError(f"A prefix of width {self.kv_width} was called with {heads} key/value heads of "
                            f"size {head_dim}; the model's attention shape changed since it was attached.")
        return tuple(t.to(dtype).view(self.tokens, heads, head_dim).transpose(0, 1).unsqueeze(0)
                     .expand(batch, -1, -1, -1) for t in self.key_value())


@register_method
class PrefixModel(DeltaBase):
    """Prefix tuning on the selected attention modules (default: every self- and cross-attention).

    Args:
        backbone_model: the model to modify in place (a transformers model whose attention routes
            through ``AttentionInterface``: all ten supported families on transformers 5).
        prefix_token_num, reparameterize, embed_dim, mid_dim: see :class:`PrefixConfig`.
        modified_modules, exclude_modules, unfrozen_modules, common_structure, delta_dtype: see
            :class:`DeltaConfig`. A selected module may be an attention block or anything that
            contains attention modules (each gets a prefix).
    """

    delta_type = "prefix"
    config_class = PrefixConfig
    default_modified_modules = ("attn", "crossattn")
    mechanism = KEY_VALUE_PREFIX
    child_name = "prefix"
    shared_name = SHARED_NAME
    config: PrefixConfig

    def _targets(self, site: Site) -> list[Site]:
        """The attention modules in ``site``: those that own a query projection."""
        if not hasattr(self, "_names"):  # once per construction, not once per site
            self._names = (common_name_index(self.backbone_model), canonical_modules(self.backbone_model))
        index, modules = self._names
        found = {}
        for name, commons in index.items():
            if (name == site.name or name.startswith(site.name + ".") or not site.name) and \
                    any(c.endswith((".q", ".attn.q")) for c in commons):
                owner = name.rpartition(".")[0]
                found[owner] = Site(owner, modules[owner])
        if not found:
            raise SiteError(f"{site.name!r} ({type(site.module).__name__}) contains no attention module "
                            "(no query projection in the structure map).")
        for target in found.values():
            problem = routing_problem(target.module)
            if problem:
                raise SiteError(f"{target.name!r}: {problem}")
        return list(found.values())

    def _build_shared(self, targets: list[Site]) -> PrefixShared | None:
        """With ``reparameterize``: the MLP's first layer, one for every attention."""
        if not (self.config.reparameterize and targets):
            return None
        device, dtype = site_placement(targets[0].module, self.config.delta_dtype)
        return PrefixShared(self.config.prefix_token_num, self.config.embed_dim, self.config.mid_dim,
                            device=device, dtype=dtype)

    def fold_reparameterization(self) -> None:
        """Replace the reparameterisation MLP by the prefixes it computes now.

        The model computes the same outputs with plain ``[P, kv_width]`` key and value prefixes
        (no MLP at run time; ``config.reparameterize`` becomes ``False``, so a checkpoint saved
        after this loads as such). Flags from ``freeze_module`` are applied to the new
        parameters. Do this before an engine wraps the model: it replaces parameters.
        """
        if not self.config.reparameterize:
            return
        self._check_usable("fold_reparameterization()")
        self.engine.check_attachable(self.backbone_model)
        sites = [att for att in self.record.attachments if att.mechanism is not HOLDER]
        with torch.no_grad():
            folded = []
            for att in sites:
                key, value = att.delta.key_value()
                plain = Prefix(att.delta.tokens, att.delta.kv_width, None, device=key.device, dtype=key.dtype)
                plain.key.copy_(key)
                plain.value.copy_(value)
                folded.append(Attachment(site=att.site, site_name=att.site_name, delta=plain,
                                         base_name=att.base_name, mechanism=att.mechanism,
                                         child_name=att.child_name))
        self.detach()
        for att in self.record.attachments:
            mechanisms.forget(att)
        self.record.attachments = folded
        self.config = self.config.replace(reparameterize=False)
        self.attach()

    def _build_delta(self, site: Site) -> DeltaModule:
        device, dtype = site_placement(site.module, self.config.delta_dtype)
        return Prefix(self.config.prefix_token_num, kv_width(site.module), self._shared,
                      device=device, dtype=dtype)


def kv_width(attention: nn.Module) -> int:
    """Key/value heads x head size of an attention module, from its model config.

    Grouped-query models set ``num_key_value_heads`` (fewer heads than queries) and often
    ``head_dim`` (not always ``hidden_size / num_attention_heads``). Which config attributes hold
    these is a fact of the family's structure map (T5 calls the head size ``d_kv``).
    """
    config = attention.config
    heads = config_value(config, "attention_heads_attrs")
    kv_heads = config_value(config, "kv_heads_attrs") or heads
    head_dim = config_value(config, "head_size_attrs")
    hidden = config_value(config, "hidden_size_attrs") if head_dim is None and heads else None
    if hidden is not None:
        head_dim = hidden // heads
    if not kv_heads or not head_dim:
        raise SiteError(f"{type(attention).__name__}: its config gives no attention head count or size.")
    return int(kv_heads) * int(head_dim)
