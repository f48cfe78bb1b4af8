"""``training.report_to`` on 2 gloo ranks: only the main rank reports (one TensorBoard log, one W&B
run, one MLflow run, holding its ``metrics.jsonl`` numbers), and a job killed on every rank and
resumed continues the same runs without a step twice. All in the slow grid: a 2-rank job with the
backends takes about a minute here (the default suite's backends are tested in one process by
``tests/e2e/test_train_reporting.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltadist.training.reporters import missing_packages
from tests.distributed.harness import run_ranks
from tests.distributed.reporting_workers import train_dying_in_step
from tests.distributed.train_workers import train_on_rank
from tests.reporting import jsonl_scalars, mlflow_runs, tensorboard_scalars, wandb_runs
from tests.task_jobs import make_job

MISSING = [package for name in ("tensorboard", "wandb", "mlflow") for package in missing_packages(name)]
pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(bool(MISSING), reason=f"needs {MISSING}: pip install 'deltadist[track]'")]

JOB = {"max_steps": 8, "batch_size": 8, "save_every": 3, "eval_every": 4,
       "report_to": ["tensorboard", "wandb", "mlflow"]}


@pytest.fixture(autouse=True)
def no_remote(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults (W&B offline, MLflow in output_dir), and the ranks' own W&B service."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_SERVICE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def steps_of(histories: dict[str, list[tuple[int, float]]]) -> dict[str, list[int]]:
    return {key: [step for step, _ in points] for key, points in histories.items()}


def check_one_run_each(run_dir: Path, expected: dict[str, list[tuple[int, float]]], mlflow: bool = True
                       ) -> tuple[str, str | None]:
    """One TensorBoard log, one W&B run id, one MLflow run (if ``mlflow``), each with ``expected``'s
    steps; the W&B and MLflow run ids."""
    assert steps_of(tensorboard_scalars(run_dir)[0]) == steps_of(expected)
    runs = wandb_runs(run_dir)
    assert len({run_id for run_id, _, _ in runs}) == 1
    history: dict[str, list[tuple[int, float]]] = {}
    for _, _, part in runs:
        for key, points in part.items():
            history.setdefault(key, []).extend(points)
    assert steps_of(history) == steps_of(expected)
    if not mlflow:
        assert not (run_dir / "mlflow.db").exists()
        return runs[0][0], None
    (run, histories), = mlflow_runs(run_dir)
    assert steps_of(histories) == steps_of(expected)
    assert [v for _, v in histories["loss"]] == pytest.approx([v for _, v in expected["loss"]], rel=1e-6)
    return runs[0][0], run.info.run_id


@pytest.mark.slow
def test_two_ranks_report_one_run_from_the_main_rank(tmp_path: Path) -> None:
    job = make_job(tmp_path, "causal_lm", **{**JOB, "report_to": ["tensorboard", "wandb"]})  # MLflow: slow
    run_ranks(train_on_rank, args=(str(job.config), ["engine=fsdp2"], False), timeout=400)
    run_dir = job.root / "run"
    assert not list(tmp_path.rglob("wandb"))[1:]
    check_one_run_each(run_dir, jsonl_scalars(run_dir), mlflow=False)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_ranks_killed_and_resumed_continue_the_same_runs(engine: str, tmp_path: Path) -> None:
    whole = make_job(tmp_path / "whole", "causal_lm", **JOB)
    run_ranks(train_on_rank, args=(str(whole.config), [f"engine={engine}"], False), timeout=400)
    job = make_job(tmp_path / "killed", "causal_lm", **JOB)
    with pytest.raises(AssertionError):  # every rank exits during step 7 (the newest checkpoint: 6)
        run_ranks(train_dying_in_step, args=(str(job.config), [f"engine={engine}"], 7), timeout=400)
    before = check_one_run_each(job.root / "run", {k: [p for p in v if p[0] <= 6]
                                                   for k, v in jsonl_scalars(whole.root / "run").items()})
    run_ranks(train_on_rank, args=(str(job.config), [f"engine={engine}"], True), timeout=400)
    assert check_one_run_each(job.root / "run", jsonl_scalars(whole.root / "run")) == before
