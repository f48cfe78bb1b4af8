"""A transformers checkpoint's model for the commands that take ``--model``/``MODEL_PATH``: the class its
``config.json`` names (``architectures``; else ``AutoModel``), built on ``meta`` (nothing read) or
loaded with its weights. Which class is data from the checkpoint, not a table of transformers' names."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltadist.errors import ConfigError


def model_class(config: Any) -> Any:
    """The transformers class ``config.architectures`` names, or ``None``."""
    import transformers

    names = getattr(config, "architectures", None) or []
    return getattr(transformers, names[0], None) if names else None


def checkpoint_config(path: str) -> Any:
    """The transformers config of the checkpoint at ``path``.

    Raises:
        OSError: no ``config.json`` there.
        ConfigError: a ``config.json`` transformers does not recognise.
    """
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(path)
    except ValueError as err:  # a config.json without a model_type transformers knows
        raise ConfigError(f"{path} is not a transformers checkpoint: {err}") from err


def meta_model(path: str) -> nn.Module:
    """The checkpoint's model built on ``meta`` from its ``config.json``: no weight is read."""
    import transformers

    config = checkpoint_config(path)
    cls = model_class(config)
    with torch.device("meta"):
        return cls(config) if cls is not None else transformers.AutoModel.from_config(config)


def load_model(path: str) -> nn.Module:
    """The checkpoint's model with its weights, in eval mode."""
    import transformers

    cls = model_class(checkpoint_config(path)) or transformers.AutoModel
    return cls.from_pretrained(path).eval()
