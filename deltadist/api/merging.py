"""Folding a delta into the backbone's weights: ``merge`` / ``unmerge`` / ``merge_and_unload``.

A mixin of ``DeltaBase``. Each delta module says whether it has a merged form
(:meth:`~deltadist.core.delta_module.DeltaModule.merge_blocker`) and folds itself into its site through
the engine (:meth:`~deltadist.core.delta_module.DeltaModule.fold_into`): the site's weight and the delta
are gathered together, one site at a time, and the sum is scattered back into whatever sharding
the weight has, so merging works the same unsharded, under FSDP2 and under ZeRO-3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deltadist.core.quantized import dequantize_backbone, is_quantized
from deltadist.errors import SiteError

if TYPE_CHECKING:
    from deltadist.core.record import DeltaRecord


class MergeMixin:
    """``merge``, ``unmerge`` and ``merge_and_unload``."""

    record: "DeltaRecord"
    backbone_model: nn.Module
    merged: bool
    unloaded: bool
    _premerge_fingerprint: Any
    engine: Any

    def merge(self) -> None:
        """Fold the delta into its sites' weights and detach it; the model then runs at the speed
        of the plain backbone with the tuned outputs.

        Works under every engine. While merged, ``save_finetuned`` still records the fingerprint
        of the unmerged backbone, so the checkpoint loads onto the pretrained model.

        Raises:
            SiteError: a site has no merged form (listed, e.g. BitFit on a module without a
                bias); nothing is changed then.
        """
        if self.merged:
            return
        self._check_usable("merge()")
        problems = [
            f"  {att.site_name}: {reason}" for att in self.record.attachments
            if (reason := self._merge_blocker(att)) is not None
        ]
        if problems:
            raise SiteError(
                f"{type(self).__name__} cannot be merged into these sites:\n" + "\n".join(problems)
                + "\nKeep the delta attached (or detach() it) instead. Nothing was changed."
            )
        self._premerge_fingerprint = self._fingerprint()
        self._fold(+1.0)
        self.detach()
        self.merged = self.record.merged = True

    def unmerge(self) -> None:
        """Take the delta out of the weights again (exact up to rounding) and re-attach it."""
        if not self.merged:
            return
        if self.unloaded:
            self._check_usable("unmerge()")
        self._fold(-1.0)
        self.merged = self.record.merged = False
        self._premerge_fingerprint = None
        self.attach()

    def merge_and_unload(self, dtype: torch.dtype | None = None) -> nn.Module:
        """Merge, then drop every trace of deltadist from the backbone and return it.

        The result is the plain model -- no delta children, hooks or state-dict hooks, the
        ``requires_grad`` flags from before ``freeze_module`` -- which ``save_pretrained`` exports
        and ``from_pretrained`` loads back to the same outputs. This delta object is spent.

        Args:
            dtype: the dtype of the returned model (``None``: as it is). A backbone with 4-bit
                (NF4) weights is dequantized first, into ``dtype`` (``None``: the dtype they were
                quantized from), and the update merged into the dequantized weights.
        """
        dequantize_backbone(self.backbone_model, dtype)
        self.merge()
        self._forget()
        self.unloaded = True
        return self.backbone_model if dtype is None else self.backbone_model.to(dtype)

    def _merge_blocker(self, att: Any) -> str | None:
        """Why ``att`` cannot be folded into its site, or ``None``."""
        weight = getattr(att.site, "weight", None)
        if isinstance(weight, torch.Tensor) and is_quantized(weight, self.engine):
            return ("its weight is stored in 4 bits, where the update would be rounded away; "
                    "merge_and_unload(dtype=...) dequantizes the backbone first")
        return att.delta.merge_blocker(att.site)

    def _fold(self, sign: float) -> None:
        engine = self.engine
        engine.settle(self.backbone_model)
        for att in self.record.attachments:
            att.delta.fold_into(att.site, engine, sign)
