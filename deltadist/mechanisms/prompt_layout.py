"""Where prompt positions go in a batch of sequences, and how to put them in and take them out.

A prompt of ``P`` positions goes right before each row's first attended position: at the front of
a right-padded (or unpadded) row, between the pads and the text of a left-padded one -- so a
left-padded row sees the same sequence (prompt, then text, at the same positions) as it would
alone. Every per-position input (embeddings, masks, token types, labels, position ids) is spread
with the same layout, and sequence outputs are taken back to the caller's length with it.
"""

from __future__ import annotations

import torch


def first_attended(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` mask -> ``[B]`` index of each row's first attended position (0 if none)."""
    return attention_mask.ne(0).int().argmax(dim=1)


class PromptLayout:
    """``P`` prompt positions inserted into ``[B, T, ...]`` sequences at per-row ``starts``."""

    def __init__(self, starts: torch.Tensor, prompt_len: int, seq_len: int) -> None:
        self.prompt_len, self.seq_len, self.starts = prompt_len, seq_len, starts
        self.batch = starts.shape[0]
        # The common case (no left padding) is a concatenation: no index tensors, exact copies.
        self.at_front = bool((starts == 0).all())
        if self.at_front:
            return
        new = torch.arange(prompt_len + seq_len, device=starts.device)[None]  # [1, P+T]
        start = starts[:, None]  # [B, 1]
        self.is_prompt = (new >= start) & (new < start + prompt_len)  # [B, P+T]
        self.source = torch.where(new < start, new, new - prompt_len).clamp(0, seq_len - 1)
        self.prompt_index = (new - start).clamp(0, prompt_len - 1)
        old = torch.arange(seq_len, device=starts.device)[None]  # [1, T]
        self.back = old + prompt_len * (old >= start)  # [B, T]: where each input position went

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor | None, prompt_len: int, seq_len: int,
                  batch: int, device: torch.device) -> "PromptLayout":
        """The layout for a call with this mask (``None``: every row starts at position 0)."""
        if attention_mask is None:
            return cls(torch.zeros(batch, dtype=torch.long, device=device), prompt_len, seq_len)
        return cls(first_attended(attention_mask), prompt_len, seq_len)

    @property
    def length(self) -> int:
        """Sequence length with the prompt: ``P + T``."""
        return self.prompt_len + self.seq_len

    def spread(self, x: torch.Tensor, fill: torch.Tensor | float | int) -> torch.Tensor:
        """``x: [B, T, ...]`` -> ``[B, P+T, ...]`` with ``fill`` (``[B, P, ...]`` or a scalar) at
        the prompt positions."""
        if not isinstance(fill, torch.Tensor):
            fill = x.new_full((x.shape[0], self.prompt_len, *x.shape[2:]), fill)
        fill = fill.to(x.dtype)
        if self.at_front:
            return torch.cat([fill, x], dim=1)
        rest = (1,) * (x.dim() - 2)
        source = _expand(self.source, x)
        prompt = _expand(self.prompt_index, fill)
        return torch.where(self.is_prompt.view(*self.is_prompt.shape, *rest),
                           fill.gather(1, prompt), x.gather(1, source))

    def take_back(self, y: torch.Tensor) -> torch.Tensor:
        """``y: [B, P+T, ...]`` -> ``[B, T, ...]``: the caller's positions only."""
        if self.at_front:
            return y[:, self.prompt_len:]
        return y.gather(1, _expand(self.back, y))


def _expand(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``[B, N]`` index broadcast over ``like``'s trailing dimensions, for ``gather(1, ...)``."""
    shape = (*index.shape, *like.shape[2:])
    return index.view(*index.shape, *(1,) * (like.dim() - 2)).expand(shape)
