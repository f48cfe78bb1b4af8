"""The best evaluation so far by ``training.best_metric``, and early stopping after
``training.patience`` evaluations in a row that do not beat it. Its state goes into every
checkpoint's run state, so a resumed run keeps the same best step and stops at the same step."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from deltadist.training.eval_metrics import improved
from deltadist.training.evaluation import Evaluation

BEST_DIRNAME = "best"


@dataclass
class BestTracker:
    """Which evaluation was the best, and how many came after it without beating it."""

    metric: str
    patience: int | None
    value: float | None = None
    step: int | None = None
    since_best: int = 0
    """Evaluations since the best one."""
    last_step: int | None = None
    """The step of the last evaluation seen (the final one may repeat it: seen once)."""

    @classmethod
    def resumed(cls, metric: str, patience: int | None, saved: dict[str, Any] | None) -> BestTracker:
        """A tracker continuing ``saved`` (a checkpoint's :meth:`state`), or a fresh one."""
        return cls(metric, patience, **(saved or {}))

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON)."""
        kept = asdict(self)
        del kept["metric"], kept["patience"]
        return kept

    def observe(self, step: int, evaluation: Evaluation) -> bool:
        """Take the evaluation of ``step``; whether it is the new best (its delta is then kept)."""
        if step == self.last_step:
            return False
        self.last_step = step
        value = evaluation.metrics()[self.metric]
        if improved(self.metric, value, self.value):
            self.value, self.step, self.since_best = value, step, 0
            return True
        self.since_best += 1
        return False

    @property
    def stopped(self) -> bool:
        """Whether ``patience`` evaluations in a row did not beat the best: the job stops."""
        return self.patience is not None and self.since_best >= self.patience

    def log_fields(self) -> dict[str, Any]:
        """Its fields of an evaluation's ``metrics.jsonl`` row."""
        return {"best_step": self.step, f"best_{self.metric}": self.value}
