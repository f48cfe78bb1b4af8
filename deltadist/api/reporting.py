"""What a delta reports about itself and its model: ``log`` (OpenDelta's) and PEFT's trainable counts.

A mixin of ``DeltaBase``; the tree and the tables are drawn by :mod:`deltadist.interactive.visualize`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from deltadist.engines import Engine


class ReportMixin:
    """``log``, ``get_nb_trainable_parameters`` and ``print_trainable_parameters``."""

    backbone_model: nn.Module
    engine: "Engine"

    def log(self, module: nn.Module | None = None, delta_ratio: bool = True,
            trainable_ratio: bool = True, visualization: bool = True) -> str:
        """Print the module tree (sites and deltas marked) and parameter ratios; return the text."""
        from deltadist.interactive.visualize import log_delta

        return log_delta(self, module if module is not None else self.backbone_model,
                         delta_ratio=delta_ratio, trainable_ratio=trainable_ratio,
                         visualization=visualization)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` logical parameter counts of the backbone with its deltas (PEFT's name)."""
        from deltadist.interactive.visualize import parameter_summary

        summary = parameter_summary(self.backbone_model, self.engine)
        return summary["trainable"], summary["total"]

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: ... || all params: ... || trainable%: ...`` as PEFT does."""
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}")
