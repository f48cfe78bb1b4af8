"""deltadist -> PEFT: plan the adapter config and key names of a LoRA delta, and write PEFT's
adapter directory (``save_finetuned(path, format="peft")``). The format is described in
:mod:`deltadist.io.peft`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from deltadist.addressing.facts import weight_is_transposed
from deltadist.addressing.names import canonical_modules, canonical_parameters, dot_prefixes, dot_suffixes
from deltadist.addressing.select import without_skipped
from deltadist.core import attach as mechanisms
from deltadist.core.record import delta_key
from deltadist.errors import CheckpointError, ConfigError
from deltadist.io import checkpoint
from deltadist.io.peft import CONFIG_NAME, LORA_KIND, MAGNITUDE_KEY, METADATA_KEY, PREFIX, WEIGHTS_NAME

# PEFT's task type by the end of the model's class name (None: plain PeftModel).
_TASK_TYPES = (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
               ("ForQuestionAnswering", "QUESTION_ANS"), ("ForCausalLM", "CAUSAL_LM"),
               ("LMHeadModel", "CAUSAL_LM"))
# What PEFT's task classes add to modules_to_save on their own (peft_model.py).
_AUTO_MODULES_TO_SAVE = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                         "QUESTION_ANS": ("qa_outputs",)}


Joins = dict[str, tuple[tuple[str, str], int]]
"""PEFT key -> two deltadist keys written as one, and the dim they are concatenated along."""


@dataclass(frozen=True)
class PeftExport:
    """What ``save_finetuned(format="peft")`` writes, decided before anything is gathered."""

    adapter_config: dict[str, Any]
    keys: dict[str, str]
    """deltadist checkpoint key -> PEFT key."""
    joins: Joins = field(default_factory=dict)
    """PEFT key -> the two deltadist keys written as one, concatenated along that dim, the second
    negated when the dim is 1: a PiSSA / OLoRA branch ``s (B A - B0 A0)`` as the rank-2r LoRA
    ``[B, -B0] [A; A0]`` (PEFT's own conversion)."""
    stacked: dict[str, str] = field(default_factory=dict)
    """deltadist key of a 3-D expert LoRA tensor -> ``"A"`` or ``"B"``: written in PEFT's
    ``ParamWrapper`` layout (:func:`to_peft_layout`)."""


def to_peft_layout(value: torch.Tensor, part: str) -> torch.Tensor:
    """An expert LoRA tensor as PEFT's ``ParamWrapper`` stores it: ``A [E, r, in] -> [E * r, in]``
    (expert-major), ``B [E, out, r] -> [out, r * E]`` (expert-minor: column ``k * E + e``)."""
    if part == "A":
        return value.reshape(-1, value.shape[-1])
    return value.permute(1, 2, 0).reshape(value.shape[1], -1)


def from_peft_layout(value: torch.Tensor, part: str, experts: int) -> torch.Tensor:
    """The inverse of :func:`to_peft_layout` for ``experts`` experts."""
    if part == "A":
        return value.reshape(experts, -1, value.shape[-1])
    return value.reshape(value.shape[0], -1, experts).permute(2, 0, 1)


def parameter_keys(held: Sequence[tuple[str, str]], order: Sequence[str]) -> dict[str, str]:
    """PEFT's key prefix of each targeted parameter ``(module, parameter)``: PEFT nests one
    ``ParamWrapper`` per parameter of a module, the first in ``order`` (the module's own parameter
    order) innermost, so each sits under one ``base_layer.`` per targeted parameter after it."""
    keys = {}
    for module, leaf in held:
        later = [p for m, p in held if m == module and order.index(p) > order.index(leaf)]
        keys[f"{module}.{leaf}"] = f"{PREFIX}{module}." + "base_layer." * len(later)
    return keys


def plan_export(delta: Any, base_model_name_or_path: str | None) -> PeftExport:
    """The PEFT config and key names for ``delta`` (every rank computes it; names only).

    Raises:
        ConfigError: the delta is not LoRA, or has sites PEFT's LoRA cannot wrap (each named).
    """
    if delta.delta_type != LORA_KIND:
        raise ConfigError(
            f"PEFT's LoRA format can hold only a LoRA delta; this is a {delta.delta_type!r} delta "
            f"({type(delta).__name__}), which it cannot express. Nothing was written. Save it in "
            "deltadist's format (save_finetuned(path)), or export the plain model with "
            "merge_and_unload().save_pretrained(path) where the method can merge."
        )
    lora = [att for att in delta.record.attachments if not att.mechanism.copies_backbone]
    held = [att for att in lora if getattr(att.delta, "parameter_name", None) is not None]
    lora = [att for att in lora if att not in held]
    sites = {att.site_name: att.site for att in lora}  # trained copies are modules_to_save below
    problems = [
        "the model root itself (PEFT puts LoRA on submodules only)" if not name else
        f"{name} ({type(module).__name__}; PEFT's LoRA wraps nn.Linear and transformers' Conv1D)"
        for name, module in sites.items() if not name or not _peft_linear(module)
    ]
    if problems:
        raise ConfigError(
            "PEFT's LoRA format cannot express LoRA on these sites:\n  " + "\n  ".join(problems)
            + "\nNothing was written. Leave them out of modified_modules, or save in deltadist's format."
        )
    backbone = delta.backbone_model
    modules = _backbone_modules(backbone)
    kept = list(delta.record.kept_backbone)
    task_type = _task_type(backbone, delta.engine.model_class_name(backbone))
    wholly_kept = _wholly_kept(backbone, modules, kept, set(sites))
    if task_type in _AUTO_MODULES_TO_SAVE and not _can_save(_AUTO_MODULES_TO_SAVE[task_type], modules,
                                                             wholly_kept, sites):
        task_type = None  # its automatic modules_to_save would need tensors the delta does not hold
    to_save = list(dict.fromkeys(
        top for name in kept if (top := _top_wholly_kept(name, wholly_kept)) is not None
        and _can_save([top], modules, wholly_kept, sites)
    ))
    keys, joins, paired = _delta_keys(delta, lora)
    stacked = _parameter_keys(held, keys)
    for name in kept:  # in a LoRA-wrapped module PEFT's parameter lives under base_layer
        module, _, leaf = name.rpartition(".")
        keys[name] = f"{PREFIX}{module}.base_layer.{leaf}" if module in sites else PREFIX + name
    config = delta.config
    adapter_config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": config.lora_r * (2 if paired else 1),
        # twice the rank at the same scale: alpha / r, or alpha / sqrt(r) under rsLoRA
        "lora_alpha": config.lora_alpha * ((math.sqrt(2) if config.use_rslora else 2) if paired else 1),
        "lora_dropout": config.lora_dropout, "target_modules": _target_modules(list(sites), modules),
        "modules_to_save": to_save or None, "bias": "none", "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "fan_in_fan_out": bool(sites) and all(weight_is_transposed(m) for m in sites.values()),
        "target_parameters": _target_parameters([att.site_name for att in held], backbone) or None,
        "init_lora_weights": True if paired else config.init_lora_weights, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    return PeftExport(adapter_config, keys, joins, stacked)


def _parameter_keys(held: list[Any], keys: dict[str, str]) -> dict[str, str]:
    """Add PEFT's key of each parameter-site LoRA tensor to ``keys``; return the 3-D ones' parts."""
    by_site = {att.site_name: att for att in held}
    pairs = [(att.site_name.rpartition(".")[0], att.delta.parameter_name) for att in held]
    stacked = {}
    for site_name, prefix in parameter_keys(pairs, _order_of(held)).items():
        att = by_site[site_name]
        for part in ("lora_A", "lora_B"):
            mine = delta_key(att.site_name, att.base_name, part)
            keys[mine] = f"{prefix}{part}.weight"
            if att.delta.lora_A.dim() == 3:
                stacked[mine] = part[-1]
    return stacked


def _order_of(held: list[Any]) -> list[str]:
    """Every parameter name of the sites' modules, in their modules' own order."""
    return list(dict.fromkeys(n for att in held for n in att.site._parameters))


def _target_parameters(names: list[str], backbone: nn.Module) -> list[str]:
    """PEFT ``target_parameters`` selecting exactly the parameters ``names``: the shortest
    dot-suffix each that no other parameter ends with (PEFT matches no regex here)."""
    if not names:
        return []
    params = {n: None for n in canonical_parameters(backbone)}
    chosen = _target_modules(names, params)
    return chosen if isinstance(chosen, list) else sorted(names)


def _delta_keys(delta: Any, lora: list[Any]) -> tuple[dict[str, str], Joins, bool]:
    """PEFT's key of each LoRA tensor (deltadist key -> PEFT key), the joined pairs of a PiSSA /
    OLoRA branch (see :attr:`PeftExport.joins`), and whether there are such pairs."""
    paired = any(getattr(att.delta, "initial_A", None) is not None for att in lora)
    keys, joins = {}, {}
    for att in lora:
        for part, dim in (("lora_A", 0), ("lora_B", 1)):
            mine = delta_key(att.site_name, att.base_name, part)
            theirs = f"{PREFIX}{att.site_name}.{part}.weight"
            if paired:
                joins[theirs] = ((mine, delta_key(att.site_name, att.base_name, f"initial_{part[-1]}")), dim)
            else:
                keys[mine] = theirs
        if delta.config.use_dora:
            magnitude = delta_key(att.site_name, att.base_name, "magnitude")
            keys[magnitude] = f"{PREFIX}{att.site_name}.{MAGNITUDE_KEY}"
    return keys, joins, paired


def write_peft(directory: str | Path, tensors: Mapping[str, torch.Tensor], export: PeftExport,
               config: dict[str, Any]) -> Path:
    """Write a PEFT adapter directory atomically, as :func:`checkpoint.write_checkpoint` does
    (main rank only): weights first, then ``adapter_config.json``.

    Raises:
        CheckpointError: the tensors are not this delta's, or a write failed (nothing half-written).
    """
    expected = set(export.keys) | {key for parts, _ in export.joins.values() for key in parts}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"The tensors to save are not this delta's (missing: {missing[:5]}, unexpected: "
            f"{unexpected[:5]}); nothing was written to {directory}. Pass state_dict=None."
        )
    peft_tensors = {export.keys[key]: (to_peft_layout(value, export.stacked[key]) if key in export.stacked
                                       else value).contiguous()
                    for key, value in tensors.items() if key in export.keys}
    for peft_key, ((first, second), dim) in export.joins.items():
        peft_tensors[peft_key] = torch.cat([tensors[first], tensors[second] * (-1 if dim else 1)], dim)
    embedded = {**config, checkpoint.CHECKSUM_KEY: checkpoint.tensors_sha256(peft_tensors),
                "peft_adapter_config": export.adapter_config}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(embedded, sort_keys=True)}
    text = json.dumps(export.adapter_config, indent=2, sort_keys=True)
    directory = Path(directory)
    checkpoint._make_directory(directory)
    weights = directory / WEIGHTS_NAME
    checkpoint.atomic_write(weights, lambda tmp: save_file(peft_tensors, tmp, metadata=metadata))
    checkpoint.atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text + "\n"))
    return weights


def _peft_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or weight_is_transposed(module)


def _backbone_modules(backbone: nn.Module) -> dict[str, nn.Module]:
    """Canonical name -> module, root and every delta's modules left out (PEFT sees a bare model)."""
    skip = frozenset(id(m) for m in mechanisms.delta_modules(backbone).values())
    return {n: m for n, m in without_skipped(canonical_modules(backbone), skip).items() if n}


def _task_type(backbone: nn.Module, class_name: str) -> str | None:
    model = getattr(backbone, "module", backbone)
    if class_name.endswith("ForConditionalGeneration"):
        encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        return "SEQ_2_SEQ_LM" if encoder_decoder else None
    return next((task for end, task in _TASK_TYPES if class_name.endswith(end)), None)


def _wholly_kept(backbone: nn.Module, modules: dict[str, nn.Module], kept: list[str],
                 sites: set[str]) -> set[str]:
    """Modules PEFT can hold as modules_to_save: every state-dict entry is a kept parameter (no
    persistent buffers), and no LoRA site is in, above or below them."""
    delta_ids = mechanisms.delta_parameter_ids(backbone)
    kept_set = set(kept)
    above_sites = {prefix for site in sites for prefix in dot_prefixes(site)}
    found = set()
    for name in {prefix for p in kept for prefix in dot_prefixes(p.rpartition(".")[0]) if prefix}:
        module = modules.get(name)
        if module is None or name in above_sites or any(pre in sites for pre in dot_prefixes(name)):
            continue
        params = [f"{name}.{p}" for p, value in module.named_parameters() if id(value) not in delta_ids]
        buffers = [b for sub in module.modules() for b in sub._buffers
                   if b not in sub._non_persistent_buffers_set]
        if not buffers and all(p in kept_set for p in params):
            found.add(name)
    return found


def _top_wholly_kept(param: str, wholly_kept: set[str]) -> str | None:
    """The outermost wholly kept module holding ``param``, if any."""
    parts = param.split(".")[:-1]
    return next((".".join(parts[:end]) for end in range(1, len(parts) + 1)
                 if ".".join(parts[:end]) in wholly_kept), None)


def _can_save(entries: Sequence[str], modules: dict[str, nn.Module], wholly_kept: set[str],
              sites: Mapping[str, nn.Module]) -> bool:
    """Whether PEFT can load ``entries`` as modules_to_save: every module it would wrap (PEFT
    matches ``name.endswith(entry)``) is wholly kept, and no LoRA site matches PEFT's exclusion
    pattern for them (which would silently drop the LoRA)."""
    wrapped = [n for n in modules if any(n.endswith(e) for e in entries)]
    clash = any(re.match(rf"(^|.*\.){e}($|\..*)", s) for e in entries for s in sites)
    return not clash and all(n in wholly_kept for n in wrapped)


def _target_modules(sites: list[str], modules: Mapping[str, nn.Module]) -> list[str] | str:
    """PEFT ``target_modules`` selecting exactly ``sites``: per site its shortest dot-suffix that no
    other module ends with (PEFT's list rule: equal, or ends with ``"." + target``), sorted; a
    full-match regex of the names if some site has none."""
    site_set = set(sites)
    taken = {suffix for name in modules if name not in site_set for suffix in dot_suffixes(name)}
    chosen = set()
    for site in sites:
        suffix = next((s for s in reversed(list(dot_suffixes(site))) if s not in taken), None)
        if suffix is None:
            return "|".join(re.escape(s) for s in sites)
        chosen.add(suffix)
    return sorted(chosen)
