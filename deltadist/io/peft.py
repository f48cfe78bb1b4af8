"""PEFT's LoRA adapter format, both ways: ``save_finetuned(path, format="peft")`` and
``from_finetuned`` of a directory PEFT wrote.

A PEFT LoRA directory holds ``adapter_config.json`` (``peft_type: "LORA"``, ``r``, ``lora_alpha``,
``target_modules``, ``modules_to_save``, ...) and ``adapter_model.safetensors`` with the keys
``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and ``...lora_B.weight`` (``[out, r]``).
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

import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from deltadist.addressing.names import canonical_modules, canonical_parameters, dot_prefixes, dot_suffixes
from deltadist.addressing.select import DELTAS_KEYWORD, select_kept_parameters, select_sites, without_skipped
from deltadist.core import attach as mechanisms
from deltadist.core.record import delta_key
from deltadist.errors import CheckpointError, ConfigError, DeltaError
from deltadist.io import checkpoint

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
"""Where PEFT's ``PeftModel`` keeps the base model: every key starts with it."""
_METADATA_KEY = "deltadist_config"
_KIND = "lora"  # LoraModel.child_name: the middle part of deltadist's keys
_LORA_KEY = re.compile(r"(.+)\.(lora_A|lora_B)\.weight")

# PEFT's task type by the end of the model's class name (None: plain PeftModel).
_TASK_TYPES = (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
               ("ForQuestionAnswering", "QUESTION_ANS"), ("ForCausalLM", "CAUSAL_LM"),
               ("LMHeadModel", "CAUSAL_LM"))
# What PEFT's task classes add to modules_to_save on their own (peft_model.py).
_AUTO_MODULES_TO_SAVE = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                         "QUESTION_ANS": ("qa_outputs",)}
# adapter_config.json fields that change what LoRA computes and have no deltadist equivalent:
# refused when set (truthy). use_rslora is mapped instead (lora_alpha * sqrt(r)).
_UNSUPPORTED = (
    ("use_dora", "DoRA (use_dora)"), ("lora_bias", "a bias on lora_B (lora_bias)"),
    ("rank_pattern", "per-module ranks (rank_pattern)"),
    ("alpha_pattern", "per-module alphas (alpha_pattern)"),
    ("layer_replication", "replicated layers (layer_replication)"),
    ("target_parameters", "LoRA on bare parameters (target_parameters)"),
    ("trainable_token_indices", "trainable tokens (trainable_token_indices)"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"), ("use_qalora", "QA-LoRA"),
    ("arrow_config", "Arrow routing (arrow_config)"), ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ("megatron_config", "Megatron-parallel layers (megatron_config)"),
)


def is_peft_directory(directory: Path) -> bool:
    """Whether ``directory`` is a PEFT adapter (and not a deltadist checkpoint)."""
    return (directory / CONFIG_NAME).is_file() and not (directory / checkpoint.WEIGHTS_NAME).is_file()


# -- deltadist -> PEFT ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PeftExport:
    """What ``save_finetuned(format="peft")`` writes, decided before anything is gathered."""

    adapter_config: dict[str, Any]
    keys: dict[str, str]
    """deltadist checkpoint key -> PEFT key."""


def plan_export(delta: Any, base_model_name_or_path: str | None) -> PeftExport:
    """The PEFT config and key names for ``delta`` (every rank computes it; names only).

    Raises:
        ConfigError: the delta is not LoRA, or has sites PEFT's LoRA cannot wrap (each named).
    """
    if delta.delta_type != _KIND:
        raise ConfigError(
            f"PEFT's LoRA format can hold only a LoRA delta; this is a {delta.delta_type!r} delta "
            f"({type(delta).__name__}), which it cannot express. Nothing was written. Save it in "
            "deltadist's format (save_finetuned(path)), or export the plain model with "
            "merge_and_unload().save_pretrained(path) where the method can merge."
        )
    sites = {att.site_name: att.site for att in delta.record.attachments}
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
    keys = {delta_key(att.site_name, att.base_name, p): f"{PREFIX}{att.site_name}.{p}.weight"
            for att in delta.record.attachments for p in ("lora_A", "lora_B")}
    for name in kept:  # in a LoRA-wrapped module PEFT's parameter lives under base_layer
        module, _, leaf = name.rpartition(".")
        keys[name] = f"{PREFIX}{module}.base_layer.{leaf}" if module in sites else PREFIX + name
    config = delta.config
    adapter_config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": config.lora_r, "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout, "target_modules": _target_modules(list(sites), modules),
        "modules_to_save": to_save or None, "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": all(type(m).__name__ == "Conv1D" for m in sites.values()),
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    return PeftExport(adapter_config, keys)


def write_peft(directory: str | Path, tensors: Mapping[str, torch.Tensor], export: PeftExport,
               config: dict[str, Any]) -> Path:
    """Write a PEFT adapter directory atomically, as :func:`checkpoint.write_checkpoint` does
    (main rank only): weights first, then ``adapter_config.json``.

    Raises:
        CheckpointError: the tensors are not this delta's, or a write failed (nothing half-written).
    """
    missing = sorted(set(export.keys) - set(tensors))
    unexpected = sorted(set(tensors) - set(export.keys))
    if missing or unexpected:
        raise CheckpointError(
            f"The tensors to save are not this delta's (missing: {missing[:5]}, unexpected: "
            f"{unexpected[:5]}); nothing was written to {directory}. Pass state_dict=None."
        )
    peft_tensors = {export.keys[key]: value.contiguous() for key, value in tensors.items()}
    embedded = {**config, checkpoint.CHECKSUM_KEY: checkpoint.tensors_sha256(peft_tensors),
                "peft_adapter_config": export.adapter_config}
    metadata = {"format": "pt", _METADATA_KEY: json.dumps(embedded, sort_keys=True)}
    text = json.dumps(export.adapter_config, indent=2, sort_keys=True)
    directory = Path(directory)
    checkpoint._make_directory(directory)
    weights = directory / WEIGHTS_NAME
    checkpoint.atomic_write(weights, lambda tmp: save_file(peft_tensors, tmp, metadata=metadata))
    checkpoint.atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text + "\n"))
    return weights


def _peft_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


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


# -- PEFT -> deltadist ---------------------------------------------------------------------------
def read_peft(directory: Path, backbone: nn.Module,
              default_roles: Sequence[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A deltadist LoRA config and tensors (deltadist keys) equivalent to the PEFT adapter in
    ``directory``, for ``backbone``.

    ``modified_modules`` is the first of these that selects exactly the modules the file has LoRA
    tensors for: the deltadist patterns saved with it (an export of deltadist's), PEFT's
    ``target_modules`` (and ``exclude_modules``), or the modules' names. ``unfrozen_modules`` is
    ``"deltas"`` plus the backbone parameters in the file (by module where a whole module is).

    Raises:
        CheckpointError: not a LoRA adapter, only a pickle, a corrupt file, or something deltadist's
            LoRA cannot express (each named).
    """
    adapter = _read_adapter_config(directory)
    tensors, embedded = _read_weights(directory)
    _warn_if_config_changed(directory, adapter, embedded)
    delta_ids = mechanisms.delta_parameter_ids(backbone)
    params = {n for n, p in canonical_parameters(backbone).items() if id(p) not in delta_ids}
    lora: dict[str, torch.Tensor] = {}
    sites: list[str] = []
    backbone_keys: dict[str, str] = {}
    odd: list[str] = []
    for key in tensors:
        match = _LORA_KEY.fullmatch(key[len(PREFIX):]) if key.startswith(PREFIX) else None
        if match:
            lora[delta_key(match[1], _KIND, match[2])] = tensors[key]
            sites.append(match[1])
        elif key.startswith(PREFIX) and not any(p.startswith("lora_") for p in key.split(".")):
            backbone_keys[key] = key[len(PREFIX):]
        else:
            odd.append(key)
    site_set = set(sites)
    for key, name in list(backbone_keys.items()):
        module, _, leaf = name.rpartition(".")
        if module.endswith(".base_layer") and module[: -len(".base_layer")] in site_set:
            name = backbone_keys[key] = f"{module[: -len('.base_layer')]}.{leaf}"
        if name not in params:
            odd.append(key)
            del backbone_keys[key]
    if odd:
        raise CheckpointError(
            f"{directory / WEIGHTS_NAME} holds tensors deltadist's LoRA cannot express on "
            f"{type(backbone).__name__}: {', '.join(sorted(odd)[:8])}"
            + (f", ... {len(odd) - 8} more" if len(odd) > 8 else "")
            + ". LoRA keys must be <module>.lora_A.weight / lora_B.weight (no DoRA magnitudes, "
            "lora_B biases or embedding LoRA), other keys must name parameters of this backbone."
        )
    if not lora:
        raise CheckpointError(f"{directory / WEIGHTS_NAME} holds no LoRA tensors (lora_A / lora_B).")
    order = {name: i for i, name in enumerate(canonical_parameters(backbone))}
    kept = sorted(backbone_keys.values(), key=order.__getitem__)
    r, alpha = adapter.get("r", 8), adapter.get("lora_alpha", 8)
    config: dict[str, Any] = {
        "delta_type": _KIND, "lora_r": r, "lora_dropout": adapter.get("lora_dropout", 0.0),
        # PEFT's rsLoRA scale is alpha / sqrt(r); deltadist's is lora_alpha / r.
        "lora_alpha": alpha * math.sqrt(r) if adapter.get("use_rslora") else alpha,
        **_selection(backbone, sites, adapter, embedded, default_roles),
        "unfrozen_modules": _unfrozen(backbone, params, kept),
        "backbone_checkpoint_name": adapter.get("base_model_name_or_path"),
    }
    for field in ("delta_name", "delta_dtype", "backbone_class", "backbone_hash", "backbone_samples"):
        if embedded.get(field) is not None:
            config[field] = embedded[field]
    tensors = {**lora, **{backbone_keys[k]: tensors[k] for k in backbone_keys}}
    return config, tensors


def _read_adapter_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    try:
        adapter = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err}). Save the adapter again.") from err
    if not isinstance(adapter, dict):
        raise CheckpointError(f"{path} does not hold a JSON object.")
    if adapter.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{path} describes a PEFT {adapter.get('peft_type')!r} adapter; deltadist reads PEFT's "
            "LoRA adapters only (peft_type 'LORA')."
        )
    unsupported = [what for field, what in _UNSUPPORTED if adapter.get(field)]
    if unsupported:
        raise CheckpointError(
            f"{path} uses PEFT LoRA features deltadist's LoRA cannot express: {', '.join(unsupported)}. "
            "Nothing was changed."
        )
    return adapter


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter's tensors and the deltadist config in its header (``{}`` if PEFT wrote it)."""
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        if (directory / PICKLE_NAME).is_file():
            raise CheckpointError(
                f"{directory} holds the adapter weights only as {PICKLE_NAME}, a pickle: reading it "
                "can run code, so deltadist does not. Convert it once where you trust the file: "
                f"PeftModel.from_pretrained(base, path).save_pretrained(path) writes {WEIGHTS_NAME}."
            )
        raise CheckpointError(f"No PEFT adapter weights in {directory}: {weights} is missing.")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in sorted(handle.keys())}
        embedded = json.loads(metadata.get(_METADATA_KEY, "{}"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise checkpoint._corrupt(weights, err) from err
    if not isinstance(embedded, dict):
        raise checkpoint._corrupt(weights, ValueError(f"its {_METADATA_KEY!r} entry is not a JSON object"))
    expected = embedded.get(checkpoint.CHECKSUM_KEY)
    if expected is not None and checkpoint.tensors_sha256(tensors) != expected:
        raise CheckpointError(
            f"{weights} was modified or corrupted after deltadist saved it: its tensors do not match "
            f"the SHA-256 checksum stored with them. Save the adapter again, or restore the file."
        )
    return tensors, embedded


def _warn_if_config_changed(directory: Path, adapter: dict[str, Any], embedded: dict[str, Any]) -> None:
    saved = embedded.get("peft_adapter_config")
    if not isinstance(saved, dict):
        return
    changed = sorted(k for k, v in saved.items() if adapter.get(k) != v)
    if changed:
        warnings.warn(
            f"{directory / CONFIG_NAME} differs from the config saved with {WEIGHTS_NAME} in "
            f"{', '.join(changed)} (edited, or an interrupted save?); using {CONFIG_NAME}.",
            stacklevel=4,
        )


def _selection(backbone: nn.Module, sites: list[str], adapter: dict[str, Any], embedded: dict[str, Any],
               default_roles: Sequence[str]) -> dict[str, Any]:
    """``modified_modules`` / ``exclude_modules`` / ``common_structure`` selecting exactly ``sites``."""
    targets, excluded = adapter.get("target_modules"), adapter.get("exclude_modules")
    excluded = excluded if isinstance(excluded, list) else None
    candidates = []
    if embedded:
        candidates.append((embedded.get("modified_modules"), embedded.get("exclude_modules"),
                           bool(embedded.get("common_structure"))))
    if isinstance(targets, list):  # PEFT saves a set: its order means nothing
        candidates.append((sorted(targets), excluded, False))
    elif isinstance(targets, str):  # "all-linear" is deltadist's keyword too; a regex must fullmatch
        candidates.append(([targets if targets == "all-linear" else f"[r]{targets}"], excluded, False))
    skip = frozenset(id(m) for m in mechanisms.delta_modules(backbone).values())
    wanted = set(sites)
    for modified, exclude, common in candidates:
        try:
            chosen = select_sites(backbone, modified, default_roles, exclude, common, skip=skip)
        except DeltaError:
            continue
        if {s.name for s in chosen} == wanted:
            return {"modified_modules": modified, "exclude_modules": exclude, "common_structure": common}
    order = {name: i for i, name in enumerate(canonical_modules(backbone))}
    return {"modified_modules": sorted(wanted, key=lambda n: order.get(n, len(order))),
            "exclude_modules": None, "common_structure": False}


def _unfrozen(backbone: nn.Module, params: set[str], kept: list[str]) -> list[str]:
    """``unfrozen_modules`` keeping exactly ``kept``: whole modules where all their parameters are."""
    kept_set = set(kept)
    under = Counter(pre for p in params for pre in dot_prefixes(p.rpartition(".")[0]) if pre)
    kept_under = Counter(pre for p in kept_set for pre in dot_prefixes(p.rpartition(".")[0]) if pre)
    patterns = list(dict.fromkeys(
        next((pre for pre in dot_prefixes(name.rpartition(".")[0]) if pre and kept_under[pre] == under[pre]),
             name)
        for name in kept
    ))
    unfrozen = [DELTAS_KEYWORD, *patterns]
    skip = mechanisms.delta_parameter_ids(backbone)
    if patterns and set(select_kept_parameters(backbone, unfrozen, skip)) != kept_set:
        unfrozen = [DELTAS_KEYWORD, *kept]
    return unfrozen
