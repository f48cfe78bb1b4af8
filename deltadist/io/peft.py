"""PEFT's LoRA adapter format: its file names and key prefix, and telling an adapter directory
from a deltadist checkpoint. :mod:`deltadist.io.peft_export` writes it
(``save_finetuned(path, format="peft")``), :mod:`deltadist.io.peft_import` reads a directory PEFT
wrote (``from_finetuned``).

A PEFT LoRA directory holds ``adapter_config.json`` (``peft_type: "LORA"``, ``r``, ``lora_alpha``,
``target_modules``, ``modules_to_save``, ...) and ``adapter_model.safetensors`` with the keys
``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and ``...lora_B.weight`` (``[out, r]``),
with DoRA also ``...lora_magnitude_vector`` (``[out]``).
PEFT's update is ``(lora_alpha / r) * B A dropout(x)`` on ``nn.Linear`` and transformers' ``Conv1D``
alike, as deltadist's: the tensors copy over unchanged. Backbone parameters are
``base_model.model.<parameter>`` and, inside a LoRA-wrapped module, ``<module>.base_layer.<name>``.
PEFT loads a key of a ``modules_to_save`` module into its trainable copy and needs *every* entry of
that module in the file (PEFT 0.21 raises ``KeyError`` otherwise); other backbone keys it loads
straight into the base model.

deltadist's own config (fingerprint, name, checksum of the tensors) rides along in the safetensors
header, where PEFT ignores it; ``adapter_config.json`` holds only fields PEFT >= 0.13 knows.
Reading runs no code: JSON and safetensors only.
"""

from __future__ import annotations

from pathlib import Path

from deltadist.io import checkpoint

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
"""Where PEFT's ``PeftModel`` keeps the base model: every key starts with it."""
METADATA_KEY = "deltadist_config"
"""The safetensors header entry holding deltadist's config."""
LORA_KIND = "lora"  # LoraModel.child_name: the middle part of deltadist's keys
MAGNITUDE_KEY = "lora_magnitude_vector"
"""DoRA's magnitude of a site in PEFT's files (``<module>.lora_magnitude_vector``, no ``.weight``);
deltadist's is ``<module>.lora.magnitude``."""


def is_peft_directory(directory: Path) -> bool:
    """Whether ``directory`` is a PEFT adapter (and not a deltadist checkpoint)."""
    return (directory / CONFIG_NAME).is_file() and not (directory / checkpoint.WEIGHTS_NAME).is_file()
