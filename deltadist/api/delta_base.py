"""``DeltaBase``: the user-facing delta object (OpenDelta's API) over the five steps.

address -> infer shapes -> attach -> freeze -> save/load. The delta object is not part of the
model: the backbone keeps running as the user's model, and the delta object only records what it
attached so it can freeze, detach, re-attach, save and load exactly that.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterator, Mapping

from torch import nn

from deltadist import attach as mechanisms
from deltadist import freeze
from deltadist.addressing.names import parse_patterns
from deltadist.addressing.select import Site, select_sites
from deltadist.api.saving import (
    DELTAS_KEYWORD, SaveLoadMixin, check_fingerprint, delta_param_ids, unfrozen_backbone_of,
)
from deltadist.attach import Attachment, Mechanism
from deltadist.config import DeltaConfig
from deltadist.delta_module import DeltaModule
from deltadist.engines import Engine, detect_engine, record_logical_shapes
from deltadist.errors import ConfigError, SiteError


class DeltaBase(SaveLoadMixin):
    """Base of every delta model. Subclasses set the class attributes and two hooks.

    Args:
        backbone_model: the model to modify in place (any ``nn.Module``, possibly on ``meta``).
        **kwargs: fields of the method's config (``modified_modules``, ``exclude_modules``,
            ``unfrozen_modules``, ``common_structure`` and the method's own, e.g. ``lora_r``).

    Raises:
        ConfigError: an unknown keyword or a bad value.
        AddressingError: a pattern matches no module.
        SiteError: the method cannot modify a selected module. Nothing is changed in that case.
    """

    delta_type: ClassVar[str]
    config_class: ClassVar[type[DeltaConfig]]
    default_modified_modules: ClassVar[tuple[str, ...]]
    mechanism: ClassVar[Mechanism]
    broadcast: ClassVar[bool] = False
    """Whether a selected module also selects everything inside it (BitFit's ``"attn"``)."""
    child_name: ClassVar[str]
    """Name of the delta's child module on each site (``"lora"``; ``"lora_1"`` if taken)."""

    def __init__(self, backbone_model: nn.Module, *, config: DeltaConfig | None = None,
                 interactive_modify: bool | int = False, **kwargs: Any) -> None:
        if interactive_modify:
            raise ConfigError(
                "interactive_modify (OpenDelta's web page for picking modules) is not part of "
                "deltadist. Look at Visualization(model).structure_graph() and pass "
                "modified_modules=[...]."
            )
        if config is None:
            config = self.config_class.from_dict(kwargs)
        elif kwargs:
            config = config.replace(**kwargs)
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}.")
        self._setup(config, backbone_model, adopt=False)

    def _setup(self, config: DeltaConfig, backbone_model: nn.Module, adopt: bool) -> None:
        """Select sites, then adopt the same deltas already there (``adopt``) or build and attach."""
        self.config = config
        self.backbone_model = backbone_model
        targets = self._select_targets()
        adopted = self._adopt_attached(targets) if adopt else []
        # Whether this object took over deltas already attached (``from_finetuned`` resuming).
        self.resumed = bool(adopted)
        if adopted:
            self._attachments = adopted
            return
        self.engine.check_attachable(backbone_model)
        self._attachments = self._build_attachments(targets)
        self._attach_all()
        record_logical_shapes(backbone_model, self.engine)

    @property
    def engine(self) -> Engine:
        """The engine managing the backbone now (asked anew: the model may have been wrapped)."""
        return detect_engine(self.backbone_model)

    # -- subclass hooks ------------------------------------------------------------------------
    def _targets(self, site: Site) -> list[Site]:
        """Sites actually modified for a selected site (BitFit broadcasts into sub-modules)."""
        return [site]

    def _build_delta(self, site: Site) -> DeltaModule:
        """The delta module for ``site``; raise :class:`SiteError` if it cannot be modified."""
        raise NotImplementedError

    # -- construction --------------------------------------------------------------------------
    def _select_targets(self) -> list[Site]:
        """The sites this config selects, after broadcasting; errors name what cannot be modified."""
        cfg = self.config
        attached = frozenset(id(m) for m in mechanisms.delta_modules(self.backbone_model).values())
        sites = select_sites(
            self.backbone_model, cfg.modified_modules, self.default_modified_modules,
            cfg.exclude_modules, cfg.common_structure, skip=attached, within=self.broadcast,
        )
        targets: dict[str, Site] = {}
        problems: list[str] = []
        for site in sites:
            try:
                targets.update((t.name, t) for t in self._targets(site))
            except SiteError as err:
                problems.append(f"  {err}")
        if not targets and not problems:
            problems = [f"  {s.name!r} ({type(s.module).__name__})" for s in sites[:10]]
        if problems:
            raise self._cannot_modify(problems)
        return list(targets.values())

    def _build_attachments(self, targets: list[Site]) -> list[Attachment]:
        attachments, problems = [], []
        for target in targets:
            try:
                delta = self._build_delta(target)
            except SiteError as err:
                problems.append(f"  {err}")
                continue
            attachments.append(Attachment(site=target.module, site_name=target.name, delta=delta,
                                          base_name=self.child_name, mechanism=self.mechanism))
        if problems:
            raise self._cannot_modify(problems)
        return attachments

    def _cannot_modify(self, problems: list[str]) -> SiteError:
        return SiteError(
            f"{type(self).__name__} cannot modify these modules:\n" + "\n".join(problems)
            + "\nChange modified_modules (or exclude_modules) to skip them. Nothing was changed."
        )

    def _adopt_attached(self, targets: list[Site]) -> list[Attachment]:
        """The attached deltas of this kind on exactly ``targets``, one per site, if all are there."""
        adopted = []
        for target in targets:
            same_kind = [
                a for a in mechanisms.attachments_on(target.module)
                if a.attached and a.base_name == self.child_name
            ]
            if len(same_kind) != 1:
                return []
            adopted.append(same_kind[0])
        return adopted

    def _attach_all(self) -> None:
        done: list[Attachment] = []
        try:
            for att in self._attachments:
                mechanisms.attach(att)
                done.append(att)
        except BaseException:
            for att in reversed(done):
                mechanisms.forget(att)
            raise

    # -- OpenDelta API -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: DeltaConfig | Mapping[str, Any], backbone_model: nn.Module,
                    check_hash: bool = True, **kwargs: Any) -> "DeltaBase":
        """Attach a fresh delta described by ``config`` (a config object or a dict).

        ``kwargs`` override config fields. A config that carries a ``backbone_hash`` (one that came
        from a checkpoint) is checked against ``backbone_model`` unless ``check_hash=False``.
        """
        if isinstance(config, Mapping):
            config = cls.config_class.from_dict(config)
        if check_hash and config.backbone_hash:
            check_fingerprint(config, backbone_model)
        return cls(backbone_model, config=config, **kwargs)

    def freeze_module(self, module: nn.Module | None = None, exclude: list[str] | None = None,
                      set_state_dict: bool = True) -> None:
        """Freeze every parameter of ``module`` (default: the backbone) except ``exclude``.

        Args:
            module: the module to freeze; defaults to the backbone.
            exclude: patterns kept trainable (default: the config's ``unfrozen_modules``).
                ``"deltas"`` keeps every delta parameter trainable; other patterns select
                modules (with their subtrees) or parameters (``"bias"``) by name.
            set_state_dict: make ``module.state_dict()`` hold only trainable parameters (done with
                state-dict hooks; :func:`deltadist.full_state_dict` gives the whole one back).
        """
        module = self.backbone_model if module is None else module
        self.engine.settle(module)
        patterns = list(self.config.unfrozen_modules if exclude is None else exclude)
        keep_deltas = DELTAS_KEYWORD in patterns
        others = parse_patterns([p for p in patterns if p != DELTAS_KEYWORD])
        delta_ids = delta_param_ids(module)
        freeze.set_trainable(
            module,
            lambda name, p: (keep_deltas and id(p) in delta_ids)
            or any(pat.matches_within(name) for pat in others),
        )
        if set_state_dict:
            freeze.trainable_state_dict_only(module)

    def detach(self, module: nn.Module | None = None, reset_state_dict: bool = True) -> None:
        """Turn the delta off: the backbone's modules, hooks and state-dict keys are as before it."""
        self._check_module_arg(module)
        for att in reversed(self._attachments):
            mechanisms.detach(att)

    def attach(self, module: nn.Module | None = None, reset_state_dict: bool = True) -> None:
        """Turn a detached delta back on, in its original place in every site's delta order."""
        self._check_module_arg(module)
        self._attach_all()

    def _check_module_arg(self, module: nn.Module | None) -> None:
        if module is not None and module is not self.backbone_model:
            raise ConfigError(
                "attach()/detach() act on the backbone this delta was built on; to add the delta to "
                "another model, save_finetuned() it and from_finetuned() it onto that model."
            )

    @property
    def is_attached(self) -> bool:
        return all(att.attached for att in self._attachments)

    # -- parameters ----------------------------------------------------------------------------
    def delta_parameters(self) -> dict[str, nn.Parameter]:
        """This delta's own parameters, by checkpoint key (``<site>.<kind>.<param>``)."""
        self.engine.settle(self.backbone_model)
        return {
            f"{att.site_name}.{att.base_name}.{name}": param
            for att in self._attachments
            for name, param in att.delta.named_parameters()
        }

    def unfrozen_backbone_parameters(self) -> dict[str, nn.Parameter]:
        """Backbone parameters that ``unfrozen_modules`` selects (saved with the delta)."""
        self.engine.settle(self.backbone_model)
        return unfrozen_backbone_of(self.backbone_model, self.config)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Everything this delta trains and saves, by checkpoint key."""
        yield from self.delta_parameters().items()
        yield from self.unfrozen_backbone_parameters().items()

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters to hand to an optimizer (``torch.optim.AdamW(delta.parameters())``)."""
        for _, param in self.named_parameters():
            yield param

    def num_parameters(self) -> int:
        """Logical number of values this delta saves."""
        return sum(self.engine.logical_shape(p).numel() for _, p in self.named_parameters())

    def _forget(self) -> None:
        for att in reversed(self._attachments):
            mechanisms.forget(att)

    # -- reporting -----------------------------------------------------------------------------
    def log(self, module: nn.Module | None = None, delta_ratio: bool = True,
            trainable_ratio: bool = True, visualization: bool = True) -> str:
        """Print the module tree (sites and deltas marked) and parameter ratios; return the text."""
        from deltadist.visualize import log_delta

        return log_delta(self, module if module is not None else self.backbone_model,
                         delta_ratio=delta_ratio, trainable_ratio=trainable_ratio,
                         visualization=visualization)

    def __repr__(self) -> str:
        state = "attached" if self.is_attached else "detached"
        return (f"{type(self).__name__}({len(self._attachments)} sites, "
                f"{self.num_parameters():,} parameters, {state})")

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            f"{type(self).__name__} is not a model: call the backbone model, which now runs the delta."
        )

    __call__ = forward

