"""Saving and loading a delta: ``save_finetuned`` / ``from_finetuned`` / ``load_finetuned``.

A mixin of :class:`~deltadist.api.delta_base.DeltaBase` (OpenDelta's ``SaveLoadMixin``). Every
rank calls these: the engine gathers only what the delta's record owns (its delta parameters and
kept backbone parameters) and scatters loaded values into whatever sharding the model has; the
main rank writes, and every rank learns whether that worked.

The resume rule: ``from_finetuned`` always *adds* a delta (deltas compose, as in OpenDelta), or
refuses with an error that names ``load_finetuned``; it never loads into a delta that is already
there. Loading into an existing delta -- resuming, under any engine -- is ``delta.load_finetuned``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from deltadist.addressing.select import DELTAS_KEYWORD, select_kept_parameters
from deltadist.core import attach as mechanisms
from deltadist.core.config import CONFIG_FORMAT_VERSION, DeltaConfig, canonical_delta_type
from deltadist.core.fingerprint import DIGEST_DIFFERS, STRUCTURE_DIFFERS, Fingerprint, backbone_fingerprint
from deltadist.engines import detect_engine
from deltadist.errors import BackboneMismatchError, CheckpointError, ConfigError
from deltadist.io import checkpoint, peft, peft_export, peft_import
from deltadist.io.provenance import library_versions

if TYPE_CHECKING:
    from deltadist.api.delta_base import DeltaBase


class SaveLoadMixin:
    """``state_dict``, ``save_finetuned``, ``load_state_dict``, ``from_finetuned``, ``load_finetuned``."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full, unsharded CPU copies of what :meth:`save_finetuned` writes. Call on every rank."""
        return self.engine.gather(dict(self.named_parameters()))

    def save_finetuned(self, finetuned_delta_path: str | os.PathLike = "./delta_checkpoints/",
                       save_config: bool = True, state_dict: Mapping[str, torch.Tensor] | None = None,
                       backbone_checkpoint_name: str | None = None, format: str = "deltadist") -> str:
        """Save only the delta (and the backbone parameters it keeps trainable), atomically.

        Call on every rank: only the delta's tensors are gathered, the main rank writes, and
        every rank returns once the checkpoint is complete -- or raises if writing failed.
        While merged, the fingerprint is that of the unmerged backbone.

        ``format="peft"`` writes PEFT's LoRA adapter (``adapter_config.json`` and
        ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads; a delta
        that format cannot express raises :class:`ConfigError` naming why, before anything is
        gathered or written. A checkpoint of the other format in the same directory is removed
        once the new one is written (with a warning), so the directory holds exactly one.

        Returns:
            The checkpoint directory.
        """
        if format not in ("deltadist", "peft"):
            raise ConfigError(f"format must be 'deltadist' or 'peft', got {format!r}.")
        with self.one_engine():
            return self._save(finetuned_delta_path, save_config, state_dict, backbone_checkpoint_name, format)

    def _save(self, finetuned_delta_path: str | os.PathLike, save_config: bool,
              state_dict: Mapping[str, torch.Tensor] | None, backbone_checkpoint_name: str | None,
              format: str) -> str:
        checkpoint_name = (backbone_checkpoint_name or self.config.backbone_checkpoint_name
                           or _name_or_path(self.backbone_model))
        export = None
        if format == "peft":  # decided on every rank, so a refusal never leaves a rank in a collective
            if not save_config:
                raise ConfigError("save_config=False: PEFT's format needs its adapter_config.json.")
            export = peft_export.plan_export(self, checkpoint_name)
        tensors = dict(state_dict) if state_dict is not None else self.state_dict()
        fingerprint = self._premerge_fingerprint if self.merged else self._fingerprint()
        config = self.config.replace(
            backbone_class=self.engine.model_class_name(self.backbone_model),
            backbone_hash=fingerprint.digest if fingerprint is not None else None,
            backbone_samples=fingerprint.samples_text if fingerprint is not None else None,
            backbone_checkpoint_name=checkpoint_name,
        ).to_dict()
        config.update(format_version=CONFIG_FORMAT_VERSION, library_versions=library_versions(),
                      checkpoint_keys=sorted(tensors))
        error = None
        if self.engine.is_main:
            try:
                if export is not None:
                    peft_export.write_peft(finetuned_delta_path, tensors, export, config)
                else:
                    checkpoint.write_checkpoint(finetuned_delta_path, tensors, config if save_config else {})
                checkpoint.remove_other_format(finetuned_delta_path, format)
            except Exception as err:  # noqa: BLE001 - re-raised on every rank just below
                error = err
        self.engine.broadcast_outcome(error, f"writing {finetuned_delta_path}")
        return str(finetuned_delta_path)

    def _fingerprint(self) -> Fingerprint | None:
        """The backbone's fingerprint, leaving out what the checkpoint carries (kept parameters)."""
        return backbone_fingerprint(self.backbone_model, self.engine, self.record.kept_backbone)

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], where: str = "state dict") -> None:
        """Copy ``tensors`` (checkpoint keys) into this delta, scattering into any sharding.

        Raises:
            CheckpointError: keys missing, unexpected or of the wrong shape (all listed); nothing
                is copied in that case.
            DeltaError: this delta is merged (``unmerge()`` first) or was unloaded.
        """
        self._check_usable("load_state_dict()")
        expected = dict(self.named_parameters())
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        wrong = [
            f"{k}: checkpoint {list(tensors[k].shape)} vs site {list(self.engine.logical_shape(p))}"
            for k, p in expected.items()
            if k in tensors and tuple(tensors[k].shape) != tuple(self.engine.logical_shape(p))
        ]
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"The tensors in {where} do not fit this delta on {type(self.backbone_model).__name__}:"
                + _listing("missing", missing) + _listing("unexpected", unexpected)
                + _listing("wrong shape", wrong)
                + "\nWas it saved from another delta config or backbone? Use the same "
                "modified_modules, unfrozen_modules and method arguments as at save time."
            )
        for key, param in expected.items():
            self.engine.scatter(param, tensors[key])

    @classmethod
    def from_finetuned(cls, finetuned_delta_path: str | os.PathLike, backbone_model: nn.Module,
                       delta_config: DeltaConfig | Mapping[str, Any] | None = None,
                       cache_dir: str | os.PathLike | None = None,
                       state_dict: Mapping[str, torch.Tensor] | None = None,
                       check_hash: bool = True, local_files_only: bool = False,
                       revision: str | None = None, **kwargs: Any) -> DeltaBase:
        """Attach a saved delta to ``backbone_model`` as a new delta and load its tensors.

        ``finetuned_delta_path`` is a local checkpoint directory (or a file in it) or a hub repo
        id. The delta is added to whatever deltas the backbone already has (they compose); it
        never loads into an existing one -- that is :meth:`load_finetuned`. Where a new delta
        cannot join (a model an engine has already wrapped; in a distributed run, sites that
        already carry this kind of delta) the error says to call ``load_finetuned``. If anything
        fails -- a missing or corrupt file, a different backbone checkpoint (``check_hash=False``
        skips that test), tensors that do not fit -- the backbone is left exactly as it was.
        As in OpenDelta, the backbone is put in eval mode.
        """
        directory = checkpoint.resolve_checkpoint(finetuned_delta_path, cache_dir, local_files_only, revision)
        saved, read_tensors, where = cls._reader(directory, backbone_model)
        stored = saved if delta_config is None else delta_config
        config = stored if isinstance(stored, DeltaConfig) else cls._config_from_dict(stored)
        config = config.replace(**kwargs)  # checked again, also when given as an object
        tensors = dict(state_dict) if state_dict is not None else read_tensors()
        if check_hash and config.backbone_hash:
            check_fingerprint(config, backbone_model)
        delta = cls.__new__(cls)
        delta._setup(config, backbone_model, loading_from=str(finetuned_delta_path))
        try:
            delta.load_state_dict(tensors, where=where)
        except BaseException:
            delta._forget()
            raise
        backbone_model.eval()
        return delta

    def load_finetuned(self, finetuned_delta_path: str | os.PathLike, check_hash: bool = True,
                       cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                       revision: str | None = None, hotswap: bool = False) -> None:
        """Load a saved delta's tensors into this delta (resume), on every rank, under any engine.

        ``hotswap=True`` loads another delta of the same method and sites in place of this one's
        values, as PEFT's ``hotswap_adapter`` does, so that a ``torch.compile``d model serves it
        without recompiling (LoRA: a lower rank is padded with zeros up to this delta's, another
        scale is folded into ``B``; attach with the largest rank you will swap in).

        Raises:
            CheckpointError: the file is missing or corrupt, or its tensors do not fit (listed).
            BackboneMismatchError: it was trained on another backbone (``check_hash=False`` skips).
            ConfigError: ``hotswap`` with a delta that cannot take this one's place (named why).
            DeltaError: this delta is merged (``unmerge()`` first) or was unloaded.
        """
        self._check_usable("load_finetuned()")  # else the old values stay in the merged weights
        directory = checkpoint.resolve_checkpoint(finetuned_delta_path, cache_dir, local_files_only, revision)
        saved, read_tensors, where = self._reader(directory, self.backbone_model)
        stored = self._config_from_dict(saved)
        if check_hash and stored.backbone_hash:
            check_fingerprint(stored, self.backbone_model)
        tensors = read_tensors()
        self.load_state_dict(self._loadable(stored, tensors, hotswap), where=where)

    def _loadable(self, stored: DeltaConfig, tensors: dict[str, torch.Tensor],
                  hotswap: bool) -> dict[str, torch.Tensor]:
        """``tensors`` of a delta with the config ``stored``, as this delta's parameters hold them
        (a method that can hot-swap, or refuses a checkpoint of another function, overrides this)."""
        if not hotswap:
            return tensors
        raise ConfigError(f"hotswap=True swaps LoRA deltas; this is a {self.delta_type!r} delta. Load it "
                          "with hotswap=False (a compiled model then recompiles if shapes change).")

    @classmethod
    def _reader(cls, directory: Path, backbone: nn.Module
                ) -> tuple[dict[str, Any], Callable[[], dict[str, torch.Tensor]], str]:
        """The stored config, a function reading the tensors (only called when needed), and the
        weights file's path -- from a deltadist checkpoint, or from a PEFT LoRA adapter (then in
        deltadist's keys, for ``backbone``)."""
        if peft.is_peft_directory(directory):
            if cls.delta_type != "lora":
                raise ConfigError(f"{directory} is a PEFT LoRA adapter, not a {cls.delta_type!r} delta. "
                                  "Load it with AutoDeltaModel.from_finetuned or LoraModel.from_finetuned.")
            config, tensors = peft_import.read_peft(directory, backbone, cls.default_modified_modules)
            return config, lambda: tensors, str(directory / peft.WEIGHTS_NAME)
        return (checkpoint.read_config(directory), lambda: checkpoint.read_tensors(directory),
                str(directory / checkpoint.WEIGHTS_NAME))

    @classmethod
    def _config_from_dict(cls, stored: Mapping[str, Any]) -> DeltaConfig:
        if canonical_delta_type(stored.get("delta_type", cls.delta_type)) != cls.delta_type:
            raise ConfigError(
                f"The checkpoint holds a {stored.get('delta_type')!r} delta, not {cls.delta_type!r}. "
                "Load it with AutoDeltaModel.from_finetuned."
            )
        return cls.config_class.from_dict(stored)


def check_fingerprint(config: DeltaConfig, backbone: nn.Module) -> None:
    """Refuse a backbone whose fingerprint differs from the one saved in ``config``.

    The same checkpoint in another dtype (fp32, bf16, fp16) is accepted: samples are compared
    within rounding error. The backbone parameters the checkpoint carries (its
    ``unfrozen_modules``) are left out: the checkpoint overwrites them.

    Raises:
        BackboneMismatchError: another checkpoint or architecture (the differing tensors named).
    """
    engine = detect_engine(backbone)
    actual = backbone_fingerprint(backbone, engine, carried_parameters(config, backbone))
    if actual is None:  # on the meta device: nothing to compare yet
        return
    problem = fingerprint_mismatch(config, actual, engine.model_class_name(backbone))
    if problem is not None:
        raise BackboneMismatchError(f"{problem} Load the backbone checkpoint it was trained on, or pass "
                                    "check_hash=False to load it anyway.")


def carried_parameters(config: DeltaConfig, backbone: nn.Module) -> set[str]:
    """Canonical names of the backbone parameters a delta saved with ``config`` carries (its
    ``unfrozen_modules``): left out of the fingerprint, as the delta overwrites them."""
    unfrozen = config.unfrozen_modules or [DELTAS_KEYWORD]
    return set(select_kept_parameters(backbone, unfrozen, mechanisms.delta_parameter_ids(backbone)))


def fingerprint_mismatch(config: DeltaConfig, actual: Fingerprint, here: str) -> str | None:
    """How the backbone (of class ``here``) with fingerprint ``actual`` differs from the one the delta
    saved with ``config`` was trained on, in a sentence; ``None``: the same (in any dtype)."""
    differing = actual.differing_tensors(str(config.backbone_hash), config.backbone_samples)
    if not differing:
        return None
    if differing == [STRUCTURE_DIFFERS]:
        what = "another architecture (parameter names or shapes differ)"
    elif differing == [DIGEST_DIFFERS]:
        what = (f"another checkpoint (fingerprint {actual.digest[:12]}, the delta expects "
                f"{str(config.backbone_hash)[:12]})")
    else:
        shown = ", ".join(differing[:5]) + (f", ... {len(differing) - 5} more" if len(differing) > 5 else "")
        what = f"another checkpoint ({len(differing)} tensors differ: {shown})"
    trained_on = config.backbone_class or "backbone"
    this = f"this {here}" if here != trained_on else "this backbone"
    return f"This delta was trained on a {trained_on}: {this} is {what}."


def _name_or_path(model: nn.Module) -> str | None:
    value = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(value) if value else None


def _listing(label: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = items[:20] + ([f"... {len(items) - 20} more"] if len(items) > 20 else [])
    return f"\n  {label}: " + ", ".join(shown)
