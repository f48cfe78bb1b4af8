"""Mechanisms that rewrite a model's inputs and outputs: soft prompts.

A soft prompt is ``P`` trained embeddings put into the sequence a model reads. Three placements,
each a mechanism object (see :mod:`deltadist.mechanisms.hooks`), all with forward (pre-)hooks only:

* :class:`PromptAtInputs` -- the base model of a text model (decoder-only or encoder-only: the
  module its heads sit on): its call's token embeddings get the prompt (see
  :mod:`deltadist.mechanisms.prompt_layout` for where), and the per-position inputs are spread alike:
  ``attention_mask``, ``token_type_ids`` (``other_expand_ids``), ``position_ids`` and
  ``cache_position``. Its hidden states are taken back to the caller's length *before* the heads
  and the loss, so logits, labels and the pooled token of a sequence classifier are the caller's
  -- labels need no extension, and prompt positions are never in the loss. A decoding step over
  a cache that holds the prompt already only shifts the mask and positions.
* :class:`PromptInEncoder` -- an encoder-decoder model: the encoder's input gets the prompt; the
  model's ``attention_mask`` (also the decoder's cross-attention mask) is spread once, at the
  model, whether the encoder runs inside the model call or alone (``generate()``).
* :class:`PromptAfterClassTokens` -- a vision model: the prompt follows the class token(s) in the
  embeddings' output, after position embeddings; hidden states are taken back at the model.

The prompt module is called through ``__call__`` from the hooks, so ZeRO-3 gathers its values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from deltadist.core.mechanism import Mechanism
from deltadist.errors import SiteError
from deltadist.mechanisms.model_calls import cached_length, call_by_name
from deltadist.mechanisms.prompt_layout import PromptLayout, first_attended

if TYPE_CHECKING:
    from deltadist.core.attach import Attachment

SEQUENCE_OUTPUTS = ("last_hidden_state", "hidden_states")
"""A base model's output fields with one entry per input position."""
ENCODER_OUTPUTS = ("encoder_last_hidden_state", "encoder_hidden_states")
"""An encoder-decoder's output fields with one entry per encoder input position."""

class _PromptMechanism(Mechanism):
    """Shared by the placements: the model whose outputs are taken back, and the values per-position
    inputs take at prompt positions. Its hooks are objects that hold the prompt module itself
    (they sit on the model, not on the prompt's parent) and hand the call's layout from the
    rewriting hook to the trimming one on the prompt's ``call_state``."""

    def __init__(self, model: nn.Module, expand_values: Mapping[str, int]) -> None:
        self.model = model
        """The model whose outputs are taken back to the caller's length."""
        self.expand_values = dict(expand_values)
        """``other_expand_ids``: the value each per-position input takes at prompt positions."""

    def modules(self, att: "Attachment") -> tuple[nn.Module, ...]:
        return (att.site,) if att.site is self.model else (att.site, self.model)


class _PromptHook:
    """A hook of one soft prompt: the prompt module (a module of the model, so a deep copy or a
    pickle maps it to the copy's), how errors name it, and the placement's constants."""

    def __init__(self, att: "Attachment", expand_values: Mapping[str, int] | None = None,
                 fields: tuple[str, ...] = (), class_tokens: int = 0, model: nn.Module | None = None) -> None:
        self.delta, self.label = att.delta, att.site_name or "the model"
        self.expand_values, self.fields, self.class_tokens = dict(expand_values or {}), fields, class_tokens
        self.model = model
        """The model, where the encoder's own embeddings are not found (encoder-decoders)."""

    def prompt(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """``[batch, P, hidden]`` prompt embeddings in ``dtype``."""
        return self.delta(batch, dtype)


class _TakeBack(_PromptHook):
    """The model's output with sequence fields taken back to the caller's length."""

    def __call__(self, model: nn.Module, args: tuple, output: Any) -> Any:
        layout, self.delta.call_state.pending = self.delta.call_state.pending, None
        if layout is None:
            return output
        if hasattr(output, "keys"):  # a ModelOutput (or a dict)
            for key in self.fields:
                if key in output.keys() and output[key] is not None:
                    output[key] = _take_back(output[key], layout)
            return output
        return _take_back(output, layout)


class _PromptTheInputs(_PromptHook):
    """The prompt into a text model's input embeddings; per-position inputs spread alike."""

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        call = call_by_name(model, args, kwargs)
        tokens = self.delta.tokens
        mask = call.get("attention_mask")
        if cached_length(call) > 0:
            # A decoding step: the cache holds the prompt; shift the mask and positions.
            self.delta.call_state.pending = None
            if isinstance(mask, torch.Tensor):
                layout = PromptLayout(first_attended(mask), tokens, mask.shape[1])
                call["attention_mask"] = layout.spread(mask, 1)
            for key in ("cache_position", "position_ids"):
                if isinstance(call.get(key), torch.Tensor):
                    call[key] = call[key] + tokens
            return (), call
        embeds = _input_embeddings(model, call, self.label)
        batch, length = embeds.shape[:2]
        layout = PromptLayout.from_mask(mask, tokens, length, batch, embeds.device)
        call["inputs_embeds"] = layout.spread(embeds, self.prompt(batch, embeds.dtype))
        _spread_inputs(call, layout, self.expand_values)
        cache_position = call.get("cache_position")
        if isinstance(cache_position, torch.Tensor) and cache_position.numel() == length:
            steps = torch.arange(layout.length, device=cache_position.device)
            call["cache_position"] = cache_position[:1] + steps
        self.delta.call_state.pending = layout
        return (), call


class _SpreadModelMask(_PromptHook):
    """At an encoder-decoder: its attention mask (also the cross-attention's) spread once."""

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        call = call_by_name(model, args, kwargs)
        mask = call.get("attention_mask")
        layout = None
        if isinstance(mask, torch.Tensor):
            layout = PromptLayout(first_attended(mask), self.delta.tokens, mask.shape[1])
            call["attention_mask"] = layout.spread(mask, 1)
        # The encoder runs inside this call only without encoder_outputs; then its outputs
        # (encoder_last_hidden_state) are the caller's to read, at the caller's length.
        runs_encoder = call.get("encoder_outputs") is None
        self.delta.call_state.pending = layout if runs_encoder else None
        return (), call


class _PromptTheEncoder(_PromptHook):
    """The prompt into an encoder's input embeddings (its mask spread if the model did not)."""

    def __call__(self, encoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        call = call_by_name(encoder, args, kwargs)
        embeds = _input_embeddings(encoder, call, self.label, fallback=self.model)
        batch, length = embeds.shape[:2]
        mask = call.get("attention_mask")
        spread_mask = isinstance(mask, torch.Tensor) and mask.shape[1] == length
        # A mask already spread by the model call is P longer; its prompt starts where the
        # caller's first attended position was, so the layout is the same either way.
        layout = PromptLayout.from_mask(mask, self.delta.tokens, length, batch, embeds.device)
        call["inputs_embeds"] = layout.spread(embeds, self.prompt(batch, embeds.dtype))
        if spread_mask:
            call["attention_mask"] = layout.spread(mask, 1)
        return (), call


class _InsertAfterClassTokens(_PromptHook):
    """The prompt after the class token(s) of a vision model's embeddings output."""

    def __call__(self, embeddings: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        batch, length = output.shape[:2]
        starts = torch.full((batch,), self.class_tokens, dtype=torch.long, device=output.device)
        layout = PromptLayout(starts, self.delta.tokens, length)
        self.delta.call_state.pending = layout
        return layout.spread(output, self.prompt(batch, output.dtype))


class PromptAtInputs(_PromptMechanism):
    """The prompt at a text model's input embeddings (decoder-only and encoder-only models)."""

    name = "prompt_inputs"

    def wire(self, att: "Attachment", module: nn.Module) -> list[RemovableHandle]:
        return [module.register_forward_pre_hook(_PromptTheInputs(att, self.expand_values), with_kwargs=True),
                module.register_forward_hook(_TakeBack(att, fields=SEQUENCE_OUTPUTS))]


class PromptInEncoder(_PromptMechanism):
    """The prompt at an encoder-decoder's encoder input; the model's mask spread to match."""

    name = "prompt_encoder"

    def wire(self, att: "Attachment", module: nn.Module) -> list[RemovableHandle]:
        if module is self.model:
            return [module.register_forward_pre_hook(_SpreadModelMask(att), with_kwargs=True),
                    module.register_forward_hook(_TakeBack(att, fields=ENCODER_OUTPUTS))]
        return [module.register_forward_pre_hook(_PromptTheEncoder(att, model=self.model), with_kwargs=True)]


class PromptAfterClassTokens(_PromptMechanism):
    """The prompt after the class token(s) of a vision model's embeddings output."""

    name = "prompt_after_class_tokens"

    def __init__(self, model: nn.Module, class_tokens: int) -> None:
        super().__init__(model, {})
        self.class_tokens = class_tokens

    def wire(self, att: "Attachment", module: nn.Module) -> list[RemovableHandle]:
        if module is self.model:
            return [module.register_forward_hook(_TakeBack(att, fields=SEQUENCE_OUTPUTS))]
        return [module.register_forward_hook(_InsertAfterClassTokens(att, class_tokens=self.class_tokens))]


def _spread_inputs(call: dict[str, Any], layout: PromptLayout, expand_values: Mapping[str, int]) -> None:
    """Spread ``call``'s per-position inputs (all but the embeddings) with ``layout``."""
    length = layout.seq_len
    mask = call.get("attention_mask")
    positions = call.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.shape[-1] == length:
        call["position_ids"] = _spread_positions(positions, mask, layout)
    if isinstance(mask, torch.Tensor):
        call["attention_mask"] = layout.spread(mask, 1)  # whatever other_expand_ids says
    for key, value in expand_values.items():
        tensor = call.get(key)
        if key != "attention_mask" and _per_position(tensor, length):
            call[key] = layout.spread(tensor, value)


def _input_embeddings(module: nn.Module, call: dict[str, Any], label: str,
                      fallback: nn.Module | None = None) -> torch.Tensor:
    """The call's token embeddings (``inputs_embeds``, else the embedding of ``input_ids``,
    taken out of the call)."""
    ids = call.pop("input_ids", None)
    embeds = call.get("inputs_embeds")
    if embeds is not None:
        return embeds
    if ids is None:
        raise SiteError(f"The soft prompt at {label!r} needs input_ids or "
                        "inputs_embeds in the call.")
    owner = module if hasattr(module, "get_input_embeddings") else fallback
    return owner.get_input_embeddings()(ids)


def _per_position(value: Any, length: int) -> bool:
    """A ``[B, T]`` tensor: one entry per input position."""
    return isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == length


def _spread_positions(positions: torch.Tensor, mask: torch.Tensor | None,
                      layout: PromptLayout) -> torch.Tensor:
    """Position ids with the prompt: it takes the positions from the row's first attended one on,
    and the attended positions after it move up by ``P``; pads keep theirs."""
    positions = positions.expand(layout.batch, -1)
    attended = torch.ones_like(positions) if mask is None else mask.ne(0).to(positions.dtype)
    first = positions.gather(1, layout.starts[:, None].to(positions.device))  # [B, 1]
    prompt = first + torch.arange(layout.prompt_len, device=positions.device)[None]
    return layout.spread(positions + layout.prompt_len * attended, prompt)


def _take_back(value: Any, layout: PromptLayout) -> Any:
    """Sequence tensors (also inside tuples) taken back to the caller's length."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[1] == layout.length:
            return layout.take_back(value)
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_take_back(v, layout) for v in value)
    return value
