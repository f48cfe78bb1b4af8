"""PEFT -> deltadist: read a LoRA adapter directory PEFT wrote (or deltadist exported) as an
equivalent deltadist LoRA config and tensors, refusing what deltadist's LoRA cannot express. The
format is described in :mod:`deltadist.io.peft`.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from deltadist.addressing.names import canonical_modules, canonical_parameters, dot_prefixes
from deltadist.addressing.select import DELTAS_KEYWORD, select_kept_parameters, select_sites
from deltadist.core import attach as mechanisms
from deltadist.core import jsontext
from deltadist.core.record import delta_key
from deltadist.errors import CheckpointError, DeltaError
from deltadist.io import checkpoint
from deltadist.io.peft import (
    CONFIG_NAME,
    LORA_KIND,
    MAGNITUDE_KEY,
    METADATA_KEY,
    PICKLE_NAME,
    PREFIX,
    WEIGHTS_NAME,
)
from deltadist.io.peft_export import from_peft_layout, parameter_keys

_LORA_KEY = re.compile(r"(.+)\.(?:(lora_A|lora_B)\.weight|(lora_magnitude_vector))")
"""A LoRA tensor's key after :data:`PREFIX`: ``<site>.lora_A.weight``, ``<site>.lora_B.weight`` or
(DoRA) ``<site>.lora_magnitude_vector``."""
_PART = {"lora_A": "lora_A", "lora_B": "lora_B", MAGNITUDE_KEY: "magnitude"}
"""PEFT's name of each LoRA tensor -> deltadist's."""
_CONVERTED_INITS = ("pissa", "olora", "corda", "loftq", "eva")
"""init_lora_weights values that change the base model: an adapter so initialised works only on
the residual base PEFT made, unless it was converted to a plain LoRA when saved."""

# adapter_config.json fields that change what LoRA computes and have no deltadist equivalent:
# refused when set (truthy). use_rslora and use_dora are mapped to deltadist's fields.
_UNSUPPORTED = (
    ("lora_bias", "a bias on lora_B (lora_bias)"),
    ("rank_pattern", "per-module ranks (rank_pattern)"),
    ("alpha_pattern", "per-module alphas (alpha_pattern)"),
    ("layer_replication", "replicated layers (layer_replication)"),
    ("trainable_token_indices", "trainable tokens (trainable_token_indices)"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"), ("use_qalora", "QA-LoRA"),
    ("arrow_config", "Arrow routing (arrow_config)"), ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ("megatron_config", "Megatron-parallel layers (megatron_config)"),
)


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
    held, held_sites = _parameter_tensors(adapter, backbone, tensors, params)
    lora, sites, backbone_keys = _sort_keys(directory, backbone, tensors, params)
    lora, sites = {**lora, **held}, sites + held_sites
    if not lora:
        raise CheckpointError(f"{directory / WEIGHTS_NAME} holds no LoRA tensors (lora_A / lora_B).")
    order = {name: i for i, name in enumerate(canonical_parameters(backbone))}
    kept = sorted(backbone_keys.values(), key=order.__getitem__)
    init = adapter.get("init_lora_weights", True)
    config: dict[str, Any] = {
        "delta_type": LORA_KIND, "lora_r": adapter.get("r", 8), "lora_alpha": adapter.get("lora_alpha", 8),
        "lora_dropout": adapter.get("lora_dropout", 0.0), "use_rslora": bool(adapter.get("use_rslora")),
        "use_dora": bool(adapter.get("use_dora")),
        # The loaded values replace any initialisation; the names both libraries share are kept.
        "init_lora_weights": init if isinstance(init, bool) or init == "gaussian" else True,
        **_selection(backbone, sites, adapter, embedded, default_roles),
        "unfrozen_modules": _unfrozen(backbone, params, kept),
        "backbone_checkpoint_name": adapter.get("base_model_name_or_path"),
    }
    for field in ("delta_name", "delta_dtype", "backbone_class", "backbone_hash", "backbone_samples"):
        if embedded.get(field) is not None:
            config[field] = embedded[field]
    tensors = {**lora, **{backbone_keys[k]: tensors[k] for k in backbone_keys}}
    return config, tensors


def _parameter_tensors(adapter: dict[str, Any], backbone: nn.Module, tensors: dict[str, torch.Tensor],
                       params: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The LoRA tensors of PEFT's ``target_parameters`` (taken out of ``tensors``) by deltadist key,
    in deltadist's layout, and their parameter sites (``<module>.<parameter>``). PEFT selects a
    parameter whose name equals a target or ends with ``"." + target``."""
    targets = adapter.get("target_parameters") or []
    values = canonical_parameters(backbone)
    found = [n for n in values if n in params and any(n == t or n.endswith("." + t) for t in targets)]
    if not found:
        return {}, []
    pairs = [tuple(n.rsplit(".", 1)) for n in found]
    order = list(dict.fromkeys(leaf for name in found
                               for leaf in backbone.get_submodule(name.rpartition(".")[0])._parameters))
    held: dict[str, torch.Tensor] = {}
    for site, prefix in parameter_keys(pairs, order).items():
        shape = values[site].shape
        for part in ("lora_A", "lora_B"):
            value = tensors.pop(f"{prefix}{part}.weight", None)
            if value is None:
                raise CheckpointError(f"The adapter targets the parameter {site} but holds no "
                                      f"{prefix}{part}.weight.")
            if len(shape) == 3:
                value = from_peft_layout(value, part[-1], shape[0])
            held[delta_key(site, LORA_KIND, part)] = value
    return held, found


def _sort_keys(directory: Path, backbone: nn.Module, tensors: dict[str, torch.Tensor], params: set[str]
               ) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """The file's LoRA tensors (by deltadist key) with their sites, and its backbone keys -> the
    parameter of ``backbone`` (among ``params``) each loads into.

    Raises:
        CheckpointError: some key is neither (all such keys are named).
    """
    lora: dict[str, torch.Tensor] = {}
    sites: list[str] = []
    backbone_keys: dict[str, str] = {}
    odd: list[str] = []
    for key in tensors:
        match = _LORA_KEY.fullmatch(key[len(PREFIX):]) if key.startswith(PREFIX) else None
        if match:
            lora[delta_key(match[1], LORA_KIND, _PART[match[2] or match[3]])] = tensors[key]
            if match[2]:
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
            + ". LoRA keys must be <module>.lora_A.weight / lora_B.weight / lora_magnitude_vector (no "
            "lora_B biases or embedding LoRA), other keys must name parameters of this backbone."
        )
    return lora, sites, backbone_keys


def _read_adapter_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    try:
        adapter = jsontext.loads(path.read_text())
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
    init = adapter.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_CONVERTED_INITS):
        unsupported.append(f"init_lora_weights={init!r} without conversion to a plain LoRA (the adapter "
                           "works only on the residual base model PEFT made; save it with PEFT's "
                           "path_initial_model_for_weight_conversion)")
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
        embedded = jsontext.loads(metadata.get(METADATA_KEY, "{}"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise checkpoint._corrupt(weights, err) from err
    if not isinstance(embedded, dict):
        raise checkpoint._corrupt(weights, ValueError(f"its {METADATA_KEY!r} entry is not a JSON object"))
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
            chosen = select_sites(backbone, modified, default_roles, exclude, common, skip=skip,
                                  parameters=True)
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
