"""Loading a transformers checkpoint into a backbone built on ``meta`` and maybe sharded.

Tensors are memory-mapped and read one at a time; each engine reads only what its rank keeps
(:meth:`deltadist.engines.Engine.load`). A weight laid out as NF4 on ``meta``
(:func:`deltadist.core.quantized.quantize_backbone`) is quantized as it is read, so the
full-precision model never exists in memory. Buffers only a constructor can compute (rotary
``inv_freq``) are rebuilt from the owning module's config, and tied weights are tied again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from deltadist.addressing.names import canonical_name
from deltadist.core.attach import delta_parameter_ids
from deltadist.core.quantized import is_quantized, quantize_backbone, to_nf4
from deltadist.engines import Engine, detect_engine
from deltadist.engines.base import TensorSource
from deltadist.errors import CheckpointError, EngineError


def tied_parameters(model: nn.Module) -> list[list[str]]:
    """Names of parameters shared by several modules (tied embeddings), grouped."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Share parameters again after ``to_empty``, which gives every module its own copy."""
    for first, *others in groups:
        shared = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)


def checkpoint_files(weights: str | os.PathLike) -> list[Path]:
    directory = Path(weights)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"No model.safetensors (or its index) in {directory}; save the backbone "
                          "with save_pretrained(..., safe_serialization=True).")


def _iter_checkpoint(weights: str | os.PathLike) -> Iterator[tuple[str, TensorSource]]:
    """Every tensor of the checkpoint, memory-mapped: read whole or only some rows."""
    for path in checkpoint_files(weights):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                yield key, TensorSource(
                    full=lambda h=handle, k=key: h.get_tensor(k),
                    rows=lambda start, stop, h=handle, k=key: h.get_slice(k)[start:stop],
                )


def checkpoint_keys(weights: str | os.PathLike) -> set[str]:
    """The canonical names of the tensors a checkpoint directory holds: read from each file's
    header (its first bytes), not a byte of any tensor."""
    keys: set[str] = set()
    for path in checkpoint_files(weights):
        keys.update(canonical_name(key) for key in header_keys(path))
    return keys


def stored_keys(weights: str | os.PathLike) -> set[str]:
    """:func:`checkpoint_keys`, or for a checkpoint saved without safetensors (``pytorch_model.bin``,
    maybe sharded by its index) the keys of its pickles, memory-mapped onto ``meta``: no tensor is read.

    Raises:
        CheckpointError: the directory holds neither.
    """
    directory = Path(weights)
    index, single = directory / "pytorch_model.bin.index.json", directory / "pytorch_model.bin"
    if any(directory.glob("model*.safetensors*")) or not (index.is_file() or single.is_file()):
        return checkpoint_keys(weights)
    files = sorted({directory / n for n in json.loads(index.read_text())["weight_map"].values()}) \
        if index.is_file() else [single]
    return {canonical_name(key) for path in files
            for key in torch.load(path, mmap=True, weights_only=True, map_location="meta")}


def header_keys(path: Path) -> list[str]:
    """The tensor names in a safetensors file's header (an 8-byte little-endian length, then JSON)."""
    try:
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a safetensors file (its header cannot be read: {err}); save "
                              "the backbone with save_pretrained(..., safe_serialization=True).") from err
    return [key for key in header if key != "__metadata__"]


def modules_not_in_checkpoint(model: nn.Module, stored: set[str], prefix: str | None = None
                              ) -> tuple[str, list[str]]:
    """``(prefix, modules)``: where the checkpoint's keys (``stored``, canonical) sit in ``model``,
    and the sorted modules with a parameter the checkpoint does not hold (a new task head).

    ``prefix=None``: the model's ``base_model_prefix`` if the checkpoint is of the bare model, as
    transformers reads a base checkpoint into a model with a head, else the root.
    """
    if prefix is None:
        base = getattr(model, "base_model_prefix", "")
        bare = base and not any(key.startswith(f"{base}.") for key in stored)
        prefix = base if bare and hasattr(model, base) else ""
    start = f"{prefix}." if prefix else ""
    return prefix, sorted({name.rpartition(".")[0] for name, _ in model.named_parameters()
                           if not name.startswith(start) or canonical_name(name[len(start):]) not in stored})


def load_weights(backbone: nn.Module, weights: str | os.PathLike, prefix: str,
                  tied: list[list[str]] = (), new_modules: Iterable[str] = ()) -> None:
    """Copy checkpoint tensors into the backbone's own (non-delta) parameters and buffers.

    A checkpoint stores tied weights once; ``tied`` (groups of names, noted before wrapping) lets
    that one tensor fill every member, also where an engine (FSDP1) has untied them. Parameters
    of ``new_modules`` (names relative to ``prefix``) may be missing from the checkpoint.
    """
    root = backbone.get_submodule(prefix) if prefix else backbone
    targets: dict[str, list[torch.Tensor]] = {}
    for name, tensor in [*root.named_parameters(remove_duplicate=False), *root.named_buffers()]:
        targets.setdefault(canonical_name(name), []).append(tensor)
    relative = [[n[len(prefix) + 1:] if prefix else n for n in group
                 if not prefix or n.startswith(prefix + ".")] for group in tied]
    for group in relative:
        members = [t for n in group for t in targets.get(canonical_name(n), [])]
        for name in group:
            targets[canonical_name(name)] = members
    delta_ids = delta_parameter_ids(root)
    engine = detect_engine(backbone)
    quantized = {canonical_name(n): n for n, p in root.named_parameters() if is_quantized(p, engine)}
    placed: dict[str, nn.Parameter] = {}  # sharded quantized weights, assigned together at the end
    filled: set[int] = set()
    for key, source in _iter_checkpoint(weights):
        for target in targets.get(canonical_name(key), []):
            if id(target) in filled:
                continue
            if (name := quantized.get(canonical_name(key))) is None:
                engine.load(target, source)
                filled.add(id(target))
                continue
            param = _quantized_parameter(engine, target, source)
            if engine.shards_parameters:  # the placeholder stays in the model until then
                placed[name] = param
                filled.add(id(target))
            else:  # in place at once, so nothing holds the placeholder any longer (never tied)
                owner, _, attr = name.rpartition(".")
                setattr(root.get_submodule(owner), attr, param)
                targets[canonical_name(key)] = [param]
                filled.add(id(param))
    new = tuple(f"{m}." for m in new_modules)
    missing = sorted(
        n for n, p in root.named_parameters()
        if id(p) not in filled and id(p) not in delta_ids and not n.startswith(new)
    )
    if placed:  # one assignment for all (FSDP2 re-reads its parameters after a load_state_dict);
        root.load_state_dict(placed, strict=False, assign=True)  # never else: FSDP1's hooks would run
    if missing:
        raise CheckpointError(f"{weights} has no tensor for these backbone parameters: "
                              f"{', '.join(missing[:20])}. Check weights_prefix.")


def _quantized_parameter(engine: Engine, target: torch.Tensor, source: TensorSource) -> nn.Parameter:
    """``source`` quantized like the placeholder ``target`` and laid out (sharded) as it is: the
    full-precision tensor exists only while it is quantized, one weight at a time."""
    like = engine.stored(target)
    value = to_nf4(source.full().to(like.dtype), like=like)
    return nn.Parameter(engine.place(target, value), requires_grad=False)


def meta_buffer_owners(backbone: nn.Module) -> dict[str, tuple[type, Any]]:
    """Modules owning buffers still on ``meta`` -> (their class, their config), noted before an
    engine swaps classes (``fully_shard`` does), for :func:`recompute_buffers`."""
    return {
        owner: (type(backbone.get_submodule(owner)), nearest_config(backbone, owner))
        for owner in {n.rpartition(".")[0] for n, b in backbone.named_buffers() if b.is_meta}
    }


def nearest_config(backbone: nn.Module, owner: str) -> Any:
    """The ``config`` of ``owner`` or of its closest ancestor that has one (transformers style)."""
    parts = owner.split(".") if owner else []
    for end in range(len(parts), -1, -1):
        config = getattr(backbone.get_submodule(".".join(parts[:end])), "config", None)
        if config is not None:
            return config
    return None


def recompute_buffers(backbone: nn.Module, owners: dict[str, tuple[type, Any]],
                       device: torch.device) -> None:
    """Recompute buffers that were built on meta (rotary ``inv_freq``, ``position_ids``...).

    Each owning module is rebuilt on the CPU from its ``config`` (transformers modules take it as
    their first argument) and its buffers copied over; checkpoint values, loaded afterwards, win.
    """
    for owner, (module_type, config) in sorted(owners.items()):
        module = backbone.get_submodule(owner)
        if config is None:
            raise EngineError(
                f"{owner or 'the root'} ({module_type.__name__}) has buffers that only its "
                "constructor can compute and no config to rebuild it from. Build that module "
                "outside torch.device('meta') or register its buffers as persistent."
            )
        rebuilt = module_type(config)
        for name, buffer in rebuilt.named_buffers(recurse=False):
            getattr(module, name).copy_(buffer.to(device))


def check_nothing_on_meta(backbone: nn.Module) -> None:
    """Raise :class:`EngineError` naming what is still on ``meta`` after setup."""
    left = [n for n, t in [*backbone.named_parameters(), *backbone.named_buffers()] if t.is_meta]
    if left:
        raise EngineError(f"Still on the meta device after setup: {', '.join(left[:20])}.")


def load_quantized(build: Callable[[], nn.Module], weights: str | os.PathLike, scheme: str,
                   prefix: str | None = None, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """A model built by ``build`` with its linear weights in 4 bits, read from a checkpoint one
    tensor at a time: the full-precision model never exists (``from_pretrained`` followed by
    :func:`~deltadist.core.quantized.quantize_backbone` would hold all of it first).

    Args:
        build: makes the model (called under ``torch.device("meta")``).
        weights: a transformers checkpoint directory; its keys are relative to ``prefix``
            (``None``: the model's ``base_model_prefix`` if the checkpoint is of the bare model, as
            transformers reads a base checkpoint into a model with a head, else the root).
        scheme: ``"nf4"``.
        seed: seeds the global generator, then the modules the checkpoint does not hold (a new
            task head) are initialised by their layers' ``reset_parameters``, in full precision.

    Returns:
        The model on the CPU and the names of the modules the checkpoint did not hold.
    """
    with torch.device("meta"):
        model = build()
    prefix, new = modules_not_in_checkpoint(model, checkpoint_keys(weights), prefix)
    start = f"{prefix}." if prefix else ""
    quantize_backbone(model, scheme, skip=[model.get_submodule(name) for name in new])
    owners, tied = meta_buffer_owners(model), tied_parameters(model)
    model.to_empty(device="cpu")
    retie(model, tied)
    recompute_buffers(model, owners, torch.device("cpu"))
    load_weights(model, weights, prefix, tied,
                 new_modules=[name[len(start):] for name in new if name.startswith(start)])
    # The global generator is seeded, not forked: the run's later draws (dropout) then follow from
    # `seed` as after torch.manual_seed(seed) and from_pretrained (forked, they followed whatever
    # state the process had: a job's runs differed).
    torch.manual_seed(seed)
    for module in (model.get_submodule(name) for name in new):
        for layer in module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
    check_nothing_on_meta(model)
    return model, new
