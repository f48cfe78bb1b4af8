"""Saving and loading a delta: ``save_finetuned`` / ``from_finetuned`` / ``load_finetuned``.

A mixin of :class:`~deltadist.api.delta_base.DeltaBase` (OpenDelta's ``SaveLoadMixin``). Every
rank calls these: the engine gathers only the delta tensors (and unfrozen backbone modules) and
scatters loaded values into whatever sharding the model has; the main rank writes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from deltadist import attach as mechanisms
from deltadist import checkpoint
from deltadist.addressing.names import canonical_parameters, parse_patterns
from deltadist.config import DeltaConfig
from deltadist.engines import detect_engine
from deltadist.errors import BackboneMismatchError, CheckpointError, ConfigError
from deltadist.fingerprint import backbone_fingerprint
from deltadist.provenance import library_versions

if TYPE_CHECKING:
    from deltadist.api.delta_base import DeltaBase

DELTAS_KEYWORD = "deltas"
"""In ``unfrozen_modules`` / ``freeze_module(exclude=...)``: every delta parameter."""


class SaveLoadMixin:
    """``state_dict``, ``save_finetuned``, ``load_state_dict``, ``from_finetuned``, ``load_finetuned``."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full, unsharded CPU copies of what :meth:`save_finetuned` writes. Call on every rank."""
        return self.engine.gather(dict(self.named_parameters()))

    def save_finetuned(self, finetuned_delta_path: str | os.PathLike = "./delta_checkpoints/",
                       save_config: bool = True, state_dict: Mapping[str, torch.Tensor] | None = None,
                       backbone_checkpoint_name: str | None = None) -> str:
        """Save only the delta (and unfrozen backbone parameters), atomically.

        Call on every rank: only delta tensors are gathered, the main rank writes, and every rank
        returns once the checkpoint is complete.

        Returns:
            The checkpoint directory.
        """
        tensors = dict(state_dict) if state_dict is not None else self.state_dict()
        fingerprint = backbone_fingerprint(
            self.backbone_model, self.engine, self.unfrozen_backbone_parameters()
        )
        config = self.config.replace(
            backbone_class=self.engine.model_class_name(self.backbone_model),
            backbone_hash=fingerprint.digest if fingerprint is not None else None,
            backbone_checkpoint_name=backbone_checkpoint_name or self.config.backbone_checkpoint_name
            or _name_or_path(self.backbone_model),
        ).to_dict()
        config.update(format_version=1, library_versions=library_versions(),
                      checkpoint_keys=sorted(tensors))
        if self.engine.is_main:
            checkpoint.write_checkpoint(finetuned_delta_path, tensors, config if save_config else {})
        self.engine.barrier()
        return str(finetuned_delta_path)

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], where: str = "state dict") -> None:
        """Copy ``tensors`` (checkpoint keys) into this delta, scattering into any sharding.

        Raises:
            CheckpointError: keys missing, unexpected or of the wrong shape (all listed); nothing
                is copied in that case.
        """
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
                "modified_modules and method arguments as at save time."
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
        """Attach a saved delta to ``backbone_model`` and load its tensors.

        ``finetuned_delta_path`` is a local checkpoint directory (or a file in it) or a hub repo
        id. If anything fails -- a missing or corrupt file, a different backbone checkpoint
        (``check_hash=False`` skips that test), tensors that do not fit -- the backbone is left
        exactly as it was.

        If the backbone already carries this kind of delta on exactly the sites the config
        selects (one each), the tensors are loaded into it instead of stacking a second one: that
        is how a run resumes, also inside a model an engine has already wrapped. The result's
        ``resumed`` is then ``True`` and the backbone's train/eval mode is left alone; otherwise,
        as in OpenDelta, the backbone is put in eval mode.
        """
        directory = checkpoint.resolve_checkpoint(finetuned_delta_path, cache_dir, local_files_only, revision)
        stored = checkpoint.read_config(directory) if delta_config is None else delta_config
        config = stored if isinstance(stored, DeltaConfig) else cls._config_from_dict(stored)
        tensors = dict(state_dict) if state_dict is not None else checkpoint.read_tensors(directory)
        if check_hash and config.backbone_hash:
            check_fingerprint(config, backbone_model)
        delta = cls.__new__(cls)
        delta._setup(config.replace(**kwargs) if kwargs else config, backbone_model, adopt=True)
        try:
            delta.load_state_dict(tensors, where=str(directory / checkpoint.WEIGHTS_NAME))
        except BaseException:
            if not delta.resumed:
                delta._forget()
            raise
        if not delta.resumed:
            backbone_model.eval()  # as OpenDelta: a loaded delta is ready for inference
        return delta

    def load_finetuned(self, finetuned_delta_path: str | os.PathLike, check_hash: bool = True,
                       cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                       revision: str | None = None) -> None:
        """Load a saved delta's tensors into this delta (resume), on every rank.

        Raises:
            CheckpointError: the file is missing or corrupt, or its tensors do not fit (listed).
            BackboneMismatchError: it was trained on another backbone (``check_hash=False`` skips).
        """
        directory = checkpoint.resolve_checkpoint(finetuned_delta_path, cache_dir, local_files_only, revision)
        stored = self._config_from_dict(checkpoint.read_config(directory))
        if check_hash and stored.backbone_hash:
            check_fingerprint(stored, self.backbone_model)
        self.load_state_dict(checkpoint.read_tensors(directory), where=str(directory / checkpoint.WEIGHTS_NAME))

    @classmethod
    def _config_from_dict(cls, stored: Mapping[str, Any]) -> DeltaConfig:
        if stored.get("delta_type", cls.delta_type) != cls.delta_type:
            raise ConfigError(
                f"The checkpoint holds a {stored.get('delta_type')!r} delta, not {cls.delta_type!r}. "
                "Load it with AutoDeltaModel.from_finetuned."
            )
        return cls.config_class.from_dict(stored)



def delta_param_ids(module: nn.Module) -> set[int]:
    return {id(p) for m in mechanisms.delta_modules(module).values() for p in m.parameters()}


def unfrozen_backbone_of(backbone: nn.Module, config: DeltaConfig) -> dict[str, nn.Parameter]:
    patterns = parse_patterns([p for p in config.unfrozen_modules if p != DELTAS_KEYWORD])
    if not patterns:
        return {}
    delta_ids = delta_param_ids(backbone)
    return {
        name: p for name, p in canonical_parameters(backbone).items()
        if id(p) not in delta_ids and any(pat.matches_within(name) for pat in patterns)
    }


def check_fingerprint(config: DeltaConfig, backbone: nn.Module) -> None:
    """Refuse a backbone whose fingerprint differs from the one saved in ``config``.

    Unfrozen backbone parameters are left out: the checkpoint carries (and overwrites) them.
    """
    expected = config.backbone_hash
    skip = unfrozen_backbone_of(backbone, config)
    actual = backbone_fingerprint(backbone, detect_engine(backbone), skip)
    if actual is not None and actual.digest != expected:
        raise BackboneMismatchError(
            f"This delta was trained on another {type(backbone).__name__} checkpoint: the backbone "
            f"fingerprint is {actual.digest[:12]}, the delta expects {str(expected)[:12]}. Load the "
            "backbone it was trained on, or pass check_hash=False to load it anyway."
        )


def _name_or_path(model: nn.Module) -> str | None:
    value = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(value) if value else None


def _listing(label: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = items[:20] + ([f"... {len(items) - 20} more"] if len(items) > 20 else [])
    return f"\n  {label}: " + ", ".join(shown)
