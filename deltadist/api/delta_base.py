"""``DeltaBase``: the user-facing delta object (OpenDelta's API) over the five steps.

address -> infer shapes -> attach -> freeze -> save/load. The delta object is not part of the
model: the backbone keeps running as the user's model, and the delta object holds the one
record of what it owns (:class:`~deltadist.core.record.DeltaRecord`) so that it can freeze, detach,
re-attach, merge, save and load exactly that.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Iterator, Mapping

from torch import nn

from deltadist.addressing.select import DELTAS_KEYWORD, Site, select_sites
from deltadist.api import construction, optimizer_groups, ownership
from deltadist.api.freezing import FreezeMixin
from deltadist.api.interactive_setup import setup_interactively
from deltadist.api.merging import MergeMixin
from deltadist.api.reporting import ReportMixin
from deltadist.api.saving import SaveLoadMixin, check_fingerprint
from deltadist.core import attach as mechanisms
from deltadist.core import naming
from deltadist.core.attach import Attachment
from deltadist.core.config import DeltaConfig
from deltadist.core.delta_module import DeltaModule
from deltadist.core.mechanism import Mechanism
from deltadist.core.record import DeltaRecord
from deltadist.engines import Engine, detect_engine, record_logical_shapes
from deltadist.errors import ConfigError, DeltaError
from deltadist.interactive import picker
from deltadist.mechanisms.hooks import SPAN


class DeltaBase(FreezeMixin, MergeMixin, SaveLoadMixin, ReportMixin):
    """Base of every delta model (OpenDelta's API): address, infer shapes, attach, freeze, save.

    **A method** is one file that subclasses this, registers with ``@register_method``, and
    declares: the class attributes below (``delta_type``, ``config_class``,
    ``default_modified_modules``, ``mechanism``, ``child_name``) and the hooks of the method
    protocol. Construction (:meth:`_setup`) calls the hooks in this order, and nothing else:

    1. ``_select_sites(attached)``: the modules the config selects (default: its patterns, or the
       roles in ``default_modified_modules`` on the family's structure map);
    2. ``_targets(site)`` for each: the sites really modified (default: the site itself);
    3. ``_build_shared(targets)``: parameters every site shares, held once at the model root (or
       ``None``, the default); kept as ``self._shared`` for step 4;
    4. ``_build_delta(target)`` for each target: its :class:`DeltaModule` (every parameter made
       here, on the site's device, shapes from :mod:`deltadist.core.shapes`; never a forward);
    5. ``_mechanism_for(target)``: how that module joins the call (default: ``mechanism``, or
       :data:`~deltadist.mechanisms.SPAN` for a span);
    6. all modules are attached, or none; then ``_initialize_from_backbone()`` sets values that
       depend on the backbone's weights (again after ``prepare_model`` loads them).

    Args:
        backbone_model: the model to modify in place (any ``nn.Module``, possibly on ``meta``).
        interactive_modify: pick ``modified_modules`` on a web page instead (OpenDelta's option):
            ``True`` serves it on port 8888, an int on that port (``0``: any free one). The call
            prints the page's URL and waits; the submitted selection replaces ``modified_modules``,
            ``exclude_modules`` and ``common_structure`` (it is exact), is printed, and the delta
            is attached. See :mod:`deltadist.interactive`.
        interactive_host: interface the page listens on (only this machine by default).
        interactive_timeout: seconds to wait for a selection (``None``: no limit).
        interactive_open_browser: also open the page in the default browser.
        **kwargs: fields of the method's config (``modified_modules``, ``exclude_modules``,
            ``unfrozen_modules``, ``common_structure``, ``delta_dtype`` and the method's own,
            e.g. ``lora_r``).

    Raises:
        ConfigError: an unknown keyword or a bad value.
        AddressingError: a pattern matches no module (or, in ``unfrozen_modules``, no parameter).
        SiteError: the method cannot modify a selected module. Nothing is changed in that case.
        InteractiveError: the page could not be served, or nothing was submitted within
            ``interactive_timeout``. Nothing is changed then, nor after Ctrl-C while waiting.
    """

    delta_type: ClassVar[str]
    config_class: ClassVar[type[DeltaConfig]]
    default_modified_modules: ClassVar[tuple[str, ...]]
    mechanism: ClassVar[Mechanism]
    broadcast: ClassVar[bool] = False
    parameter_sites: ClassVar[bool] = False
    """Whether the method can modify parameter sites (``mlp.experts.gate_up_proj``: see
    :func:`deltadist.addressing.select.select_sites`), which patterns may then name (LoRA)."""
    """Whether a selected module also selects everything inside it (BitFit's ``"attn"``)."""
    child_name: ClassVar[str]
    """Name of the delta's child module on each site (``"lora"``; ``"lora_1"`` if taken)."""
    shared_name: ClassVar[str] = ""
    """Child name at the root (and key prefix) of the module :meth:`_build_shared` returns."""

    def __init__(self, backbone_model: nn.Module, *, config: DeltaConfig | None = None,
                 interactive_modify: bool | int = False, interactive_host: str = picker.LOCALHOST,
                 interactive_timeout: float | None = picker.DEFAULT_TIMEOUT_S,
                 interactive_open_browser: bool = False, **kwargs: Any) -> None:
        if config is None:
            config = self.config_class.from_dict(kwargs)
        elif isinstance(config, DeltaConfig):
            config = config.replace(**kwargs)  # checked again: its fields may have been set since
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} needs a {self.config_class.__name__}, "
                              f"got {type(config).__name__}.")
        port = picker.picker_port(interactive_modify)
        if port is None:
            self._setup(config, backbone_model)
        else:
            setup_interactively(self, config, backbone_model, port, interactive_host, interactive_timeout,
                                interactive_open_browser)

    def _setup(self, config: DeltaConfig, backbone_model: nn.Module, loading_from: str | None = None) -> None:
        """Select sites and kept parameters, build every delta module, attach all or nothing.

        ``loading_from`` (a checkpoint path) makes the errors of a refused attach point to
        ``load_finetuned``, the way to load into a delta that is already there.
        """
        self.backbone_model = backbone_model
        self.config = config
        self.merged = False
        self.unloaded = False
        self._premerge_fingerprint: Any = None
        ownership.check_attachable(self.engine, backbone_model, loading_from)
        self._name = naming.claim_name(backbone_model, self.delta_type, config.delta_name)
        targets = construction.select_targets(self)
        ownership.refuse_sites_in_copies(backbone_model, targets)
        if loading_from is not None:
            ownership.refuse_stacking_on_a_resume(self.engine, self.child_name, targets, loading_from)
        unfrozen, kept, copied = ownership.resolve_unfrozen(
            backbone_model, config.unfrozen_modules, loading=loading_from is not None,
            sites=[n for t in targets for n in (t.name, t.start_name) if n is not None])
        self.config = config.replace(unfrozen_modules=unfrozen)
        attachments = [*construction.build_attachments(self, targets),
                       *construction.copy_attachments(self, copied)]
        self.record = DeltaRecord(backbone_model, attachments, kept_backbone=kept,
                                  train_deltas=DELTAS_KEYWORD in unfrozen)
        self._attach_modules()
        try:
            self.engine.adopt(att.delta for att in self.record.attachments)
        except BaseException:
            for att in reversed(self.record.attachments):
                mechanisms.forget(att)
            raise
        self.record.register()
        naming.remember(self.record, self)
        record_logical_shapes(backbone_model, self.engine)
        if loading_from is None:  # a checkpoint's values replace them (a PiSSA SVD per site is costly)
            self._initialize_from_backbone()

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

    _pinned_engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        """The engine managing the backbone now: asked anew (the model may have been wrapped since
        the last call), except inside :meth:`one_engine`."""
        if self._pinned_engine is not None:
            return self._pinned_engine
        return detect_engine(self.backbone_model)

    @contextlib.contextmanager
    def one_engine(self) -> Iterator[Engine]:
        """Within one operation the model is not re-wrapped: find its engine once (each search
        walks every parameter of the backbone) and answer :attr:`engine` with it until the
        operation ends."""
        if self._pinned_engine is not None:  # an operation inside another one
            yield self._pinned_engine
            return
        self._pinned_engine = detect_engine(self.backbone_model)
        try:
            yield self._pinned_engine
        finally:
            self._pinned_engine = None

    # -- the method protocol (see the class docstring for the order) --------------------------
    def _targets(self, site: Site) -> list[Site]:
        """Sites actually modified for a selected site (BitFit broadcasts into sub-modules)."""
        return [site]

    def _build_delta(self, site: Site) -> DeltaModule:
        """The delta module for ``site``; raise :class:`SiteError` if it cannot be modified."""
        raise NotImplementedError

    def _mechanism_for(self, target: Site) -> Mechanism:
        """How the delta for ``target`` is wired in: the method's mechanism, or a span's."""
        return SPAN if target.start is not None else self.mechanism

    def _initialize_from_backbone(self) -> None:
        """Set initial values that depend on the backbone's weights (none by default).

        Runs when the delta is built on real weights, and again in ``prepare_model`` once the
        weights of a backbone built on ``meta`` are loaded.
        """

    def _copy_loaded_modules(self) -> None:
        """Give each trained copy its module's values (a meta-built backbone got its weights)."""
        engine = self.engine
        for att in self.record.trained_copies():
            att.delta.take_values(att.site, engine)

    def _select_sites(self, attached: frozenset[int]) -> list[Site]:
        """The sites the config's patterns select (``attached``: ids of delta modules to skip)."""
        config = self.config
        return select_sites(
            self.backbone_model, config.modified_modules, self.default_modified_modules,
            config.exclude_modules, config.common_structure, skip=attached, within=self.broadcast,
            parameters=self.parameter_sites,
        )

    # -- construction --------------------------------------------------------------------------
    def _build_shared(self, targets: list[Site]) -> DeltaModule | None:
        """A module of parameters every site uses, held once at the model root (none by default).

        Sites keep a reference to it (not a child), so it is saved, gathered and sharded once,
        under ``<shared_name>.*``.
        """
        return None

    def _attach_modules(self) -> None:
        """Attach every delta module, or none (a failure rolls back the ones done)."""
        done: list[Attachment] = []
        try:
            for att in self.record.attachments:
                mechanisms.attach(att)
                done.append(att)
        except BaseException:
            for att in reversed(done):
                mechanisms.forget(att)
            raise
        for att in self.record.attachments:  # the model keeps its acting deltas alive
            att.delta.owner.delta = self

    def _let_go(self) -> None:
        """Detached: the model no longer keeps this delta object alive."""
        for att in self.record.attachments:
            att.delta.owner.delta = None

    def _forget(self) -> None:
        """Drop every delta module from the backbone for good (a failed load, an unload)."""
        self._release_freeze(reset_state_dict=True)
        for att in reversed(self.record.attachments):
            mechanisms.forget(att)
        self._let_go()
        self.record.unregister()

    # -- attach / detach -----------------------------------------------------------------------
    def detach(self, module: nn.Module | None = None, reset_state_dict: bool = True) -> None:
        """Turn the delta off: the backbone is as it was before the delta was added.

        Its modules, hooks, state-dict keys and ``requires_grad`` flags are restored (flags that
        :meth:`freeze_module` changed and nobody changed since). With ``reset_state_dict`` (the
        default) ``freeze_module(set_state_dict=True)``'s trainable-only state dict is undone too.
        Kept backbone parameters (a trained task head) keep their trained values.
        """
        self._check_module_arg(module)
        for att in reversed(self.record.attachments):
            mechanisms.detach(att)
        self._let_go()
        self._release_freeze(reset_state_dict)

    def attach(self, module: nn.Module | None = None, reset_state_dict: bool = True) -> None:
        """Turn a detached delta back on, in its original place in every site's delta order.

        If :meth:`freeze_module` had been applied, it is applied again (and, with
        ``reset_state_dict``, its trainable-only state dict).
        """
        self._check_module_arg(module)
        self._check_usable("attach()")
        self._attach_modules()
        self._reapply_freeze(reset_state_dict)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the plain backbone inside the block; the delta is back afterwards (also on error).

        Only the hooks are turned off: modules, parameters and flags stay, so an optimizer or an
        engine holding them is undisturbed, and a compiled model switches graphs.

        Example:
            >>> with delta.disabled():  # doctest: +SKIP
            ...     reference_logits = model(**batch).logits
        """
        self._check_usable("disabled()")
        live = [a for a in self.record.attachments if a.attached and not a.suspended]
        for att in live:
            mechanisms.suspend(att)
        try:
            yield
        finally:
            for att in live:
                mechanisms.suspend(att, False)

    def _check_module_arg(self, module: nn.Module | None) -> None:
        if module is not None and module is not self.backbone_model:
            raise ConfigError(
                "attach()/detach() act on the backbone this delta was built on; to add the delta to "
                "another model, save_finetuned() it and from_finetuned() it onto that model."
            )

    def _check_usable(self, action: str) -> None:
        if self.unloaded:
            raise DeltaError(f"{action}: this delta was merged into the backbone by merge_and_unload(); "
                             "it no longer exists as a delta. Load a saved copy with from_finetuned().")
        if self.merged:
            raise DeltaError(f"{action}: this delta is merged into the weights; call unmerge() first.")

    @property
    def name(self) -> str:
        """The delta's name on its model: ``config.delta_name``, or ``<delta_type>_<n>`` (see
        :func:`deltadist.deltas_on`)."""
        return self._name

    @property
    def is_attached(self) -> bool:
        """Whether every module of this delta is attached now."""
        return all(att.attached for att in self.record.attachments)

    @property
    def state(self) -> str:
        """``"attached"``, ``"detached"``, ``"merged"`` (folded into the weights) or ``"unloaded"``."""
        if self.unloaded:
            return "unloaded"
        return "merged" if self.merged else "attached" if self.is_attached else "detached"

    @property
    def sites(self) -> list[str]:
        """Canonical names of the modules this delta modifies, in model order."""
        return self.record.site_names

    # -- parameters ----------------------------------------------------------------------------
    def delta_parameters(self) -> dict[str, nn.Parameter]:
        """This delta's own parameters, by checkpoint key (``<site>.<kind>.<param>``)."""
        self.engine.settle(self.backbone_model)
        return self.record.delta_parameters()

    def unfrozen_backbone_parameters(self) -> dict[str, nn.Parameter]:
        """Backbone parameters the delta keeps trainable and saves (a task head), by name."""
        self.engine.settle(self.backbone_model)
        return self.record.backbone_parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Everything this delta trains and saves, by checkpoint key."""
        self.engine.settle(self.backbone_model)
        yield from self.record.named_parameters().items()

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters to hand to an optimizer (``torch.optim.AdamW(delta.parameters())``)."""
        for _, param in self.named_parameters():
            yield param

    def param_groups(self, lr: float, loraplus_lr_ratio: float = 1.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups of :meth:`parameters` (LoRA+ with a ratio above 1): see
        :func:`deltadist.api.optimizer_groups.param_groups`."""
        return optimizer_groups.param_groups(self, lr, loraplus_lr_ratio)

    def num_parameters(self) -> int:
        """Logical number of values this delta saves."""
        return sum(self.engine.logical_shape(p).numel() for _, p in self.named_parameters())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, {len(self.sites)} sites, "
                f"{self.num_parameters():,} parameters, {self.state})")

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            f"{type(self).__name__} is not a model: call the backbone model, which now runs the delta."
        )

    __call__ = forward
