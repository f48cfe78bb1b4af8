"""Hand-written floors: each delta-tuning method written directly as ``nn.Module`` wrappers for one
benchmark, with no library around it (no hooks, no routing, no record). A floor is the cost a
library cannot beat by much; :mod:`benchmarks.method_step` times deltadist against it.

Each floor wraps the modules deltadist modifies for the same config (its ``delta.sites``), so both
train the same function on the same sites; the backbone is frozen in both.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F


def frozen(model: nn.Module) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def replace(model: nn.Module, names: list[str], wrap: Callable[[nn.Module], nn.Module]) -> None:
    """Put ``wrap(module)`` in place of each named module."""
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, wrap(owner.get_submodule(leaf)))


def _width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.weight.shape[0]


class LoraLinear(nn.Module):
    """``W x + s B A x``."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.A = nn.Parameter(torch.randn(r, base.in_features) * 0.01)
        self.B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale


class DoraLinear(nn.Module):
    """DoRA on a linear layer written out: ``(m / ||W + s B A||) (W x + s B A x) + b``, the norms
    detached (formed from the merged weight, as the paper writes it)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.A = nn.Parameter(torch.randn(r, base.in_features) * 0.01)
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        self.m = nn.Parameter(base.weight.detach().norm(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            norms = (self.base.weight + self.scale * self.B @ self.A).norm(dim=1)
        factor = self.m / norms
        plain = F.linear(x, self.base.weight)
        out = factor * (plain + (x @ self.A.t() @ self.B.t()) * self.scale)
        return out if self.base.bias is None else out + self.base.bias


class BiasLinear(nn.Module):
    """A linear layer with a trainable bias, fused into its product (``addmm``)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.bias = nn.Parameter(torch.zeros(_width(base)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, nn.Linear):
            bias = self.bias if self.base.bias is None else self.base.bias + self.bias
            return F.linear(x, self.base.weight, bias)
        return self.base(x) + self.bias  # a norm


class Bottleneck(nn.Module):
    """``up(act(down(h)))`` with plain, low-rank or Kronecker-sum projections."""

    def __init__(self, width: int, hidden: int, kind: str, rank: int = 1, n: int = 4) -> None:
        super().__init__()
        self.kind, self.n = kind, n
        self.act = nn.GELU(approximate="tanh")
        if kind == "plain":
            self.down, self.up = nn.Linear(width, hidden), nn.Linear(hidden, width)
            nn.init.zeros_(self.up.weight)
            return
        shapes = {"down": (width, hidden), "up": (hidden, width)}
        for name, (fan_in, fan_out) in shapes.items():
            if kind == "low_rank":
                left, right = torch.randn(fan_in, rank) * 0.02, torch.randn(rank, fan_out) * 0.02
            else:  # Kronecker sum: rule [n, n, n], weights [n, in/n, 1] @ [n, 1, out/n]
                left = torch.randn(n, fan_in // n, rank) * 0.02
                right = torch.randn(n, rank, fan_out // n) * 0.02
            self.register_parameter(f"{name}_left", nn.Parameter(left))
            self.register_parameter(f"{name}_right", nn.Parameter(right))
            self.register_parameter(f"{name}_bias", nn.Parameter(torch.zeros(fan_out)))
        if kind == "kronecker":
            self.rule = nn.Parameter(torch.randn(n, n, n) * 1e-4)

    def _project(self, x: torch.Tensor, name: str) -> torch.Tensor:
        left, right = getattr(self, f"{name}_left"), getattr(self, f"{name}_right")
        if self.kind == "low_rank":
            weight = left @ right
        else:
            blocks = left @ right  # [n, in/n, out/n]
            n, p, q = blocks.shape
            weight = torch.einsum("iab,ipq->apbq", self.rule, blocks).reshape(n * p, n * q)
        return x @ weight + getattr(self, f"{name}_bias")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "plain":
            return self.up(self.act(self.down(h)))
        return self._project(self.act(self._project(h, "down")), "up")


class After(nn.Module):
    """A sequential adapter: ``y + bottleneck(y)`` with ``y`` the module's output."""

    def __init__(self, base: nn.Module, bottleneck: Bottleneck) -> None:
        super().__init__()
        self.base, self.adapter = base, bottleneck

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden + self.adapter(hidden)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


class Beside(nn.Module):
    """A parallel adapter: ``f(x) + s * bottleneck(x)`` (``x`` the first input, the sum on the first
    output of a module that returns a tuple)."""

    def __init__(self, base: nn.Module, bottleneck: Bottleneck, scale: float) -> None:
        super().__init__()
        self.base, self.adapter, self.scale = base, bottleneck, scale

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        out = self.base(*args, **kwargs)
        hidden = (out[0] if isinstance(out, tuple) else out) + self.scale * self.adapter(x)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


class PrefixCache(nn.Module):
    """Trainable keys and values for every layer, handed to the model as a filled cache."""

    def __init__(self, config: Any, tokens: int) -> None:
        super().__init__()
        heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
        head_dim = config.hidden_size // config.num_attention_heads
        self.tokens = tokens
        self.keys = nn.Parameter(torch.randn(config.num_hidden_layers, heads, tokens, head_dim) * 0.02)
        self.values = nn.Parameter(torch.randn(config.num_hidden_layers, heads, tokens, head_dim) * 0.02)

    def cache(self, batch: int) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer in range(self.keys.shape[0]):
            keys, values = self.keys[layer], self.values[layer]
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
        return cache


def with_floor(kind: str, model: nn.Module, sites: list[str], config: dict[str, Any]) -> list[nn.Parameter]:
    """Turn the frozen ``model`` into ``kind``'s floor on ``sites``; the parameters to train."""
    frozen(model)
    if kind == "lora":
        replace(model, sites, lambda m: LoraLinear(m, config["lora_r"], config.get("lora_alpha", 16)))
    elif kind == "dora":
        replace(model, sites, lambda m: DoraLinear(m, config["lora_r"], config.get("lora_alpha", 16)))
    elif kind == "bitfit":
        replace(model, sites, BiasLinear)
    elif kind in ("adapter", "low_rank_adapter", "compacter"):
        shape = {"adapter": "plain", "low_rank_adapter": "low_rank", "compacter": "kronecker"}[kind]
        replace(model, sites, lambda m: After(m, Bottleneck(_width(m), _bottleneck(m, kind, config), shape,
                                                            config.get("low_rank_rank", 1))))
    elif kind == "parallel_adapter":
        replace(model, sites, lambda m: Beside(m, Bottleneck(_in_width(m), config["bottleneck_dim"], "plain"),
                                               config.get("scaled", 1.0)))
    elif kind in ("prefix", "soft_prompt"):
        tokens = config["prefix_token_num" if kind == "prefix" else "soft_token_num"]
        extra = PrefixCache(model.config, tokens) if kind == "prefix" else \
            nn.Parameter(torch.randn(tokens, model.config.hidden_size) * 0.02)
        model.floor_prompt = extra if isinstance(extra, nn.Module) else nn.ParameterList([extra])
    else:
        raise ValueError(kind)
    return [p for p in model.parameters() if p.requires_grad]


def _bottleneck(module: nn.Module, kind: str, config: dict[str, Any]) -> int:
    return config["bottleneck_dim"] if kind == "adapter" else _width(module) // config["reduction_factor"]


def _in_width(module: nn.Module) -> int:
    first = next(m for m in module.modules() if isinstance(m, nn.Linear))
    return first.in_features


def floor_loss(kind: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss of the floor of ``kind`` on ``batch``; prompt methods add their tokens (a causal
    LM's or a BERT classifier's: ``model.base_model`` is the body, ``lm_head`` / ``pooler`` and
    ``classifier`` the head)."""
    ids = batch["input_ids"]
    if kind == "prefix":
        prefix = model.floor_prompt
        mask = torch.ones(ids.shape[0], prefix.tokens + ids.shape[1], dtype=torch.long)
        return model(**batch, attention_mask=mask, past_key_values=prefix.cache(ids.shape[0])).loss
    if kind == "soft_prompt":  # the prompt's positions leave before the head, as deltadist's do
        prompt = model.floor_prompt[0]
        embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), model.get_input_embeddings()(ids)], 1)
        out = model.base_model(inputs_embeds=embeds)
        if hasattr(model, "lm_head"):
            logits = model.lm_head(out.last_hidden_state[:, prompt.shape[0]:])
            return model.loss_function(logits, ids, model.config.vocab_size)
        return F.cross_entropy(model.classifier(out.pooler_output), batch["labels"])
    return model(**batch).loss
