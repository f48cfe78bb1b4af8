"""Where ``deltadist train`` reports besides ``metrics.jsonl`` (``training.report_to``): TensorBoard
event files, a Weights & Biases run, an MLflow run. Each gets the run's information (resolved config,
library versions, git commit) once and every ``metrics.jsonl`` row as it is written.

Only the main rank reports. A resumed job continues the same runs (the ids are in the checkpoint).
So that it never reports a step twice, a job that writes checkpoints hands rows to the backends only
once the checkpoint after them is committed (and the rest when the job ends): the rows a killed run
wrote after its newest checkpoint are the ones its resumed run writes again. Backends are imported
only when used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

REPORT_TO = ("jsonl", "tensorboard", "wandb", "mlflow")
"""``training.report_to``'s names; ``metrics.jsonl`` is always written."""
_PACKAGES = {"tensorboard": ("tensorboard",), "wandb": ("wandb",),
             "mlflow": ("mlflow", "sqlalchemy", "alembic")}
"""What each backend imports (MLflow's default store is SQLite, which needs SQLAlchemy and Alembic)."""
TENSORBOARD_DIRNAME = "tensorboard"
MLFLOW_DB_NAME = "mlflow.db"
_FLUSH_SECONDS = 1.0
"""How often W&B writes its run file (default 15 s): a killed job loses W&B rows of the last second."""
PROJECT = "deltadist"
"""The W&B project and MLflow experiment, unless ``WANDB_PROJECT`` / ``MLFLOW_EXPERIMENT_NAME`` say."""


def missing_packages(name: str) -> list[str]:
    """The packages backend ``name`` needs that are not installed (found without importing them)."""
    return [package for package in _PACKAGES.get(name, ()) if importlib.util.find_spec(package) is None]


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` row's numbers other than its step (flags and missing values left out)."""
    return {key: float(value) for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class Reporter:
    """One backend: told the run's information once, then rows; :attr:`run_id` is what a resumed
    job passes back to continue the same run (``None``: nothing to continue)."""

    run_id: str | None = None

    def report(self, rows: list[dict[str, Any]]) -> None:
        """Record ``rows`` (``metrics.jsonl`` rows, each with its ``step``)."""
        raise NotImplementedError

    def close(self, finished: bool) -> None:
        """Flush and end the run (``finished``: the job ended well, else it failed)."""
        raise NotImplementedError


class TensorBoardReporter(Reporter):
    """Event files in ``output_dir/tensorboard/``: each number of a row a scalar of its step, the
    run's information a text entry. A resumed job purges what a killed one wrote after ``step``."""

    def __init__(self, output_dir: Path, info: dict[str, Any], run_id: str | None, step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / TENSORBOARD_DIRNAME),
                                    purge_step=None if step is None else step + 1)
        if step is None:
            self.writer.add_text("run_info", f"```\n{json.dumps(info, indent=2)}\n```")

    def report(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            for key, value in scalars(row).items():
                self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def close(self, finished: bool) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    """A W&B run in ``output_dir/wandb/``: offline unless ``WANDB_API_KEY`` is set (``WANDB_MODE``
    overrides); never prompts. The run's information is its config; each row is a history row whose
    ``step`` is every chart's x-axis (W&B's own step is left to count rows, so a row is written at
    once and a resumed run's rows need no order with the killed one's)."""

    def __init__(self, output_dir: Path, info: dict[str, Any], run_id: str | None, step: int | None) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), dir=str(output_dir),
                              name=output_dir.name, id=run_id, resume="allow" if run_id else None,
                              mode=mode, config=info, settings=wandb.Settings(
                                  console="off", silent=True,
                                  x_transaction_log_flush_interval=_FLUSH_SECONDS))
        self.run.define_metric("*", step_metric="step")
        self.run_id = self.run.id

    def report(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.run.log({"step": row["step"], **scalars(row)})

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class MlflowReporter(Reporter):
    """An MLflow run at ``MLFLOW_TRACKING_URI``, by default a SQLite store ``output_dir/mlflow.db``
    (MLflow 3 refuses new file stores): the run's information as params (dotted keys), each number
    of a row a metric at its step."""

    def __init__(self, output_dir: Path, info: dict[str, Any], run_id: str | None, step: int | None) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=tracking_uri(output_dir))
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            name, artifact_location=(output_dir / "mlartifacts").resolve().as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=output_dir.name).info.run_id
        params = [Param(key, value) for key, value in _flat(info).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def report(self, rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, row["step"]) for row in rows
                   for key, value in scalars(row).items()]
        for start in range(0, len(metrics), 1000):  # and at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "FAILED")


def tracking_uri(output_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI``, else the SQLite store in ``output_dir``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(output_dir / MLFLOW_DB_NAME).resolve()}"


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"config": {"training": {"lr": 0.1}}}`` as ``{"config.training.lr": "0.1"}`` (lists as JSON)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat


_BACKENDS: dict[str, type[Reporter]] = {
    "tensorboard": TensorBoardReporter, "wandb": WandbReporter, "mlflow": MlflowReporter}


class Reporters:
    """The job's backends (main rank only). ``runs`` and ``step``: the run ids and step of the
    checkpoint a job resumes from. ``hold``: keep rows until :meth:`checkpointed` (a job that
    writes checkpoints), else hand each over at once."""

    def __init__(self, names: list[str], output_dir: Path, info: dict[str, Any],
                 runs: Mapping[str, str] | None, step: int | None, hold: bool) -> None:
        self.hold, self.pending = hold, []
        self.backends: dict[str, Reporter] = {}
        output_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in dict.fromkeys(names):
                if name in _BACKENDS:
                    self.backends[name] = _BACKENDS[name](output_dir, info, (runs or {}).get(name), step)
        except BaseException:
            self.close(finished=False)
            raise

    @property
    def runs(self) -> dict[str, str]:
        """Each backend's run id, for the checkpoint."""
        return {name: b.run_id for name, b in self.backends.items() if b.run_id is not None}

    def write(self, row: dict[str, Any]) -> None:
        self.pending.append(row)
        if not self.hold:
            self.checkpointed()

    def checkpointed(self) -> None:
        """Hand the rows held so far to every backend (a checkpoint after them is committed)."""
        rows, self.pending = self.pending, []
        if rows:
            for backend in self.backends.values():
                backend.report(rows)

    def close(self, finished: bool) -> None:
        """End every run; a finished job first hands over the rows still held."""
        if finished:
            self.checkpointed()
        for backend in self.backends.values():
            backend.close(finished)
