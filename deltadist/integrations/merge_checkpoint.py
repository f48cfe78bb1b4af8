"""Merging a saved delta into a transformers checkpoint on disk, one module at a time:
:func:`merge_checkpoint` (``deltadist merge``).

The backbone is built on ``meta`` and the delta attached there, its own tensors read from its
checkpoint. Then each site the delta modifies gets its weights read from the checkpoint (memory-
mapped safetensors), the delta folded in as ``merge()`` folds it, and the result written out; every
other tensor is copied through. So memory holds the delta, one site's weights and one output shard
at a time: a checkpoint larger than memory merges. Before that, the checkpoint's fingerprint is
checked against the one the delta saved, from the few values of each tensor it samples (one-value
reads from the mapped files). The output is a ``save_pretrained`` directory
of the model's class (``config.json`` naming it, sharded safetensors with their index, the source's
tokenizer and other files), which plain ``from_pretrained`` loads with no deltadist installed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from deltadist.addressing.names import canonical_name
from deltadist.api.auto import AutoDeltaModel
from deltadist.api.delta_base import DeltaBase
from deltadist.api.saving import carried_parameters, fingerprint_mismatch
from deltadist.core.attach import Attachment
from deltadist.core.delta_module import DeltaModule
from deltadist.core.fingerprint import fingerprint_of, fingerprinted_parameters, sample_positions
from deltadist.engines import Engine
from deltadist.errors import BackboneMismatchError, CheckpointError, SiteError
from deltadist.io import checkpoint
from deltadist.io.backbone_weights import (
    checkpoint_files,
    header_keys,
    modules_not_in_checkpoint,
    tied_parameters,
)

MAX_SHARD_BYTES = 2 * 1024 ** 3
"""Output shards of at most this many bytes (a tensor larger than it gets a shard of its own)."""
SMALL_TENSOR = 1 << 16
"""Tensors of at most this many values are read whole for their fingerprint samples."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json", ".pt", ".pth")


@dataclass(frozen=True)
class MergeReport:
    """What :func:`merge_checkpoint` wrote."""

    directory: Path
    sites: int
    tensors: int
    shards: int


def merge_checkpoint(model: nn.Module, model_dir: str | os.PathLike, delta_dir: str | os.PathLike,
                     out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                     max_shard_bytes: int = MAX_SHARD_BYTES, within: str = "",
                     check_hash: bool = True) -> MergeReport:
    """Write ``model_dir``'s checkpoint with the delta in ``delta_dir`` merged into its weights to
    ``out_dir`` (which must not exist or be empty), one site at a time.

    Args:
        model: the checkpoint's model class built on ``meta`` from its config (nothing loaded).
        dtype: the written floating-point tensors' dtype (``None``: each as stored; merged sites
            are computed in float32 and stored in their weight's dtype).
        within: the submodule the checkpoint is of, where ``model`` is no transformers class (the
            built-in job's classifier: its ``encoder``); the output is then a checkpoint of that
            submodule, the parameters outside it (the head) written beside its own, by their names.
        check_hash: refuse a checkpoint other than the one the delta was trained on (as
            ``from_finetuned`` does; any dtype of it is the same checkpoint).

    Raises:
        SiteError: a site has no merged form (adapters, prefixes...: keep the delta attached).
        CheckpointError: the checkpoint lacks a tensor the model has, or ``out_dir`` holds files.
        BackboneMismatchError: ``check_hash`` and another checkpoint (the differing tensors named).
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} is not empty; give a new directory for the merged checkpoint.")
    delta, saved = _attach_on_meta(model, Path(delta_dir))
    source = _Source(model, model_dir, within)
    if check_hash:
        _check_backbone(model, delta, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        writer = _ShardWriter(tmp, max_shard_bytes, dtype, within)
        _write_tensors(model, delta, saved, source, writer, str(model_dir))
        shards = writer.finish()
        _write_config(model.get_submodule(within) if within else model, Path(model_dir), tmp, dtype)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return MergeReport(out, len(delta.record.attachments), writer.count, shards)


class _Source:
    """The checkpoint's tensors, memory-mapped, by the model's parameter names (a checkpoint of the
    bare model read into one with a head: the names under ``base_model_prefix``)."""

    def __init__(self, model: nn.Module, model_dir: str | os.PathLike, within: str = "") -> None:
        files = checkpoint_files(model_dir)
        self.where = {key: path for path in files for key in header_keys(path)}
        self.prefix = within or modules_not_in_checkpoint(model, {canonical_name(k) for k in self.where})[0]
        self.stored = {canonical_name(key): key for key in self.where}
        self.handles = {path: safe_open(str(path), framework="pt", device="cpu") for path in files}

    def key_of(self, name: str) -> str | None:
        """The checkpoint's key of the model's parameter or buffer ``name`` (``None``: not stored)."""
        start = f"{self.prefix}." if self.prefix else ""
        return self.stored.get(canonical_name(name[len(start):])) if name.startswith(start) else None

    def read(self, key: str) -> torch.Tensor:
        return self.handles[self.where[key]].get_tensor(key)

    def sample(self, name: str, shape: torch.Size, positions: torch.Tensor) -> torch.Tensor:
        """Parameter ``name``'s values at flat ``positions`` (float64, ``(len(positions),)``), read one
        value at a time from the mapped file (a small tensor whole); NaN, a value the fingerprint
        cannot know, where the checkpoint does not hold it (the merge then names it missing)."""
        key = self.key_of(name)
        if key is None:
            return torch.full((len(positions),), float("nan"), dtype=torch.float64)
        stored = self.handles[self.where[key]].get_slice(key)
        if tuple(stored.get_shape()) != tuple(shape):
            raise CheckpointError(f"{key} in {self.where[key]} has shape {tuple(stored.get_shape())}, the "
                                  f"model's {name} {tuple(shape)}: merge onto the checkpoint the delta was "
                                  "trained on.")
        if shape.numel() <= SMALL_TENSOR:
            return self.read(key).flatten()[positions].double()
        index = torch.stack(torch.unravel_index(positions, shape), dim=1).tolist()
        return torch.stack([stored[tuple(slice(i, i + 1) for i in at)].reshape(()) for at in index]).double()


def _check_backbone(model: nn.Module, delta: DeltaBase, source: _Source) -> None:
    """Refuse a checkpoint whose fingerprint, read from its files, differs from the delta's.

    Raises:
        BackboneMismatchError: another checkpoint or architecture (the differing tensors named).
    """
    kept = fingerprinted_parameters(model, carried_parameters(delta.config, model))
    sampled = [source.sample(name, shape, sample_positions(shape.numel())) for name, _, shape in kept
               if shape.numel() > 0]
    actual = fingerprint_of([(name, shape) for name, _, shape in kept], sampled)
    problem = fingerprint_mismatch(delta.config, actual, delta.engine.model_class_name(model))
    if problem is not None:
        raise BackboneMismatchError(f"{problem} Merge it into the checkpoint it was trained on, or pass "
                                    "check_hash=False (deltadist merge --no-check-hash) to merge anyway.")


def _write_tensors(model: nn.Module, delta: DeltaBase, saved: dict[str, torch.Tensor], source: _Source,
                   writer: "_ShardWriter", model_dir: str) -> None:
    """Every site merged, then every other parameter (the delta's value for one it trained in place)
    and stored buffer copied through."""
    written: set[str] = set()
    for att in delta.record.attachments:
        for name, tensor in _merged_site(att, delta.engine, source):
            writer.add(name, tensor)
            written.add(name)
    kept = {name: saved[name] for name in _kept_in_place(delta)}
    missing = []
    for name, _ in model.named_parameters():
        if name in written or _inside_delta(model, name):
            continue
        key = source.key_of(name)
        if name in kept or key is not None:
            writer.add(name, kept[name] if name in kept else source.read(key))
        else:
            missing.append(name)
    if missing:
        raise CheckpointError(f"{model_dir} has no tensor for {', '.join(missing[:10])}, and the delta "
                              "does not carry them: merge onto the checkpoint the delta was trained on.")
    for name, _ in model.named_buffers():  # persistent buffers the checkpoint holds
        if (key := source.key_of(name)) is not None and not _inside_delta(model, name):
            writer.add(name, source.read(key))


def _attach_on_meta(model: nn.Module, delta_dir: Path) -> tuple[DeltaBase, dict[str, torch.Tensor]]:
    """The saved delta attached to ``model`` on ``meta``, its own modules materialised and loaded;
    and the saved tensors (the backbone's parameters stay on ``meta``, so the values of any the
    delta trained in place are read from here)."""
    tied = tied_parameters(model)
    delta = AutoDeltaModel.from_config(checkpoint.read_config(delta_dir), backbone_model=model)
    problems = [f"  {att.site_name}: {reason}" for att in delta.record.attachments
                if (reason := att.delta.merge_blocker(att.site)) is not None]
    problems += [f"  {att.site_name}: its weight is tied to {', '.join(group)}"
                 for att in delta.record.attachments for group in tied
                 if any(n.startswith(f"{att.site_name}.") for n in group)]
    if problems:
        raise SiteError(f"{type(delta).__name__} cannot be merged into these sites:\n" + "\n".join(problems)
                        + "\nServe the checkpoint with the delta attached (from_finetuned) instead.")
    done: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, DeltaModule) and not any(name.startswith(d + ".") for d in done):
            module.to_empty(device="cpu")
            done.append(name)
    saved = checkpoint.read_tensors(delta_dir)
    delta.load_state_dict(saved, where=str(delta_dir))
    return delta, saved


def _merged_site(att: Attachment, engine: Engine, source: _Source) -> list[tuple[str, torch.Tensor]]:
    """Read ``att``'s site weights, fold the delta in (in float32), and return them under the model's
    names in their stored dtype; the site goes back to ``meta`` after."""
    site, prefix = att.site, f"{att.site_name}." if att.site_name else ""
    own = [(n, p) for n, p in site.named_parameters() if not _inside_delta(site, n)]
    stored_dtypes = {}
    for name, param in own:
        key = source.key_of(prefix + name)
        # A module the checkpoint lacks (a new head): the delta's copy fills it.
        value = source.read(key) if key is not None else torch.zeros(param.shape)
        stored_dtypes[name] = value.dtype
        _set(site, name, nn.Parameter(value.float(), requires_grad=False))
    att.delta.fold_into(site, engine, +1.0)
    merged = [(prefix + n, site.get_parameter(n).detach().to(stored_dtypes[n]).clone()) for n, _ in own]
    for name, param in own:
        _set(site, name, nn.Parameter(torch.empty(param.shape, device="meta"), requires_grad=False))
    return merged


def _kept_in_place(delta: DeltaBase) -> list[str]:
    """Backbone parameters the delta trained in place (``"bias"`` kept alone, not a copied module)."""
    return [name for name, param in delta.record.backbone_parameters().items() if param.is_meta]


def _inside_delta(root: nn.Module, name: str) -> bool:
    """Whether the parameter ``name`` of ``root`` belongs to a delta module."""
    module = root
    for part in name.split(".")[:-1]:
        module = getattr(module, part)
        if isinstance(module, DeltaModule):
            return True
    return False


def _set(module: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, attr, param)


class _ShardWriter:
    """Safetensors shards of at most ``limit`` bytes, and their index (transformers' layout)."""

    def __init__(self, directory: Path, limit: int, dtype: torch.dtype | None, within: str = "") -> None:
        self.directory, self.limit, self.dtype = directory, limit, dtype
        self.start = f"{within}." if within else ""
        """Names under it are written without it (the checkpoint of that submodule)."""
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = self.count = 0
        self.files: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` (floating point: in the writer's dtype, if it has one)."""
        name = name.removeprefix(self.start)
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.limit:
            self._flush()
        self.buffer[name] = tensor.contiguous()
        self.size += nbytes
        self.count += 1

    def _flush(self) -> None:
        path = self.directory / f"shard-{len(self.files)}.tmp"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.files.append(list(self.buffer))
        self.buffer, self.size = {}, 0

    def finish(self) -> int:
        """Name the shards as ``save_pretrained`` does; return how many there are."""
        if self.buffer or not self.files:
            self._flush()
        total = len(self.files)
        if total == 1:
            os.replace(self.directory / "shard-0.tmp", self.directory / "model.safetensors")
            return 1
        weight_map = {}
        for index, names in enumerate(self.files):
            final = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self.directory / f"shard-{index}.tmp", self.directory / final)
            weight_map.update({name: final for name in names})
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": weight_map}, indent=2))
        return total


def _write_config(model: nn.Module, source: Path, out: Path, dtype: torch.dtype | None) -> None:
    """``config.json`` naming the model's class (and ``dtype``), and the source's other files
    (tokenizer, generation config, chat template) copied."""
    config = model.config
    config.architectures = [type(model).__name__]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(out)
    for path in source.iterdir():
        if path.is_file() and path.name != "config.json" and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, out / path.name)
