"""``training.report_to``: TensorBoard, W&B (offline) and MLflow get the run's config, versions and git
commit and every ``metrics.jsonl`` number, read back with each backend's own reader; a missing
backend is one line before the weights load; a run resumed after a kill continues the same runs
without reporting a step twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deltadist.cli.main import main
from deltadist.training.reporters import missing_packages
from tests.e2e.test_train_tasks import killing_script
from tests.reporting import jsonl_scalars, mlflow_runs, tensorboard_scalars, wandb_runs
from tests.task_jobs import Job, make_job

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ["tensorboard", "wandb", "mlflow"]
MISSING = [package for name in BACKENDS for package in missing_packages(name)]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"needs {MISSING}: pip install 'deltadist[track]'")
JOB = {"max_steps": 8, "save_every": 3, "eval_every": 4, "report_to": ["jsonl", *BACKENDS]}
"""8 steps; checkpoints after 3 and 6; an evaluation before, after 4 and at the end."""


def git_repo(root: Path) -> str:
    """A git repository at ``root`` with one commit; its hash."""
    root.mkdir(parents=True)
    for command in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                                     "--allow-empty", "-m", "start"]):
        subprocess.run(["git", *command], cwd=root, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, check=True, capture_output=True,
                          text=True).stdout.strip()


def clean_environment(patch: pytest.MonkeyPatch) -> None:
    """No W&B key (offline), no MLflow server: the defaults."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI",
                 "MLFLOW_EXPERIMENT_NAME"):
        patch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Job, str]:
    root = tmp_path_factory.mktemp("reported")
    commit = git_repo(root / "repo")
    job = make_job(root, "causal_lm", family="llama", **JOB)
    with pytest.MonkeyPatch.context() as patch:
        clean_environment(patch)
        patch.chdir(root / "repo")
        assert main(["train", "--config", str(job.config)]) == 0
    return job, commit


def _close(got: dict[str, list[tuple[int, float]]], expected: dict[str, list[tuple[int, float]]]) -> None:
    assert sorted(got) == sorted(expected)
    for key, points in expected.items():
        assert [s for s, _ in got[key]] == [s for s, _ in points], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in points], rel=1e-6), key


def test_rows_have_grad_norm_and_peak_memory_and_the_summary_the_run_info(reported: tuple[Job, str]) -> None:
    job, commit = reported
    rows = [json.loads(line) for line in (job.root / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(r["grad_norm"] > 0 and r["peak_memory_bytes"] > 50 * 2**20 for r in steps)
    info = json.loads((job.root / "run" / "metrics.json").read_text())["run_info"]
    assert info["git_commit"] == commit and info["config"]["training"]["report_to"] == JOB["report_to"]
    assert info["versions"]["torch"].startswith(".".join(__import__("torch").__version__.split(".")[:2]))


def test_tensorboard_holds_the_jsonl_numbers(reported: tuple[Job, str]) -> None:
    job, commit = reported
    scalars, text = tensorboard_scalars(job.root / "run")
    _close(scalars, jsonl_scalars(job.root / "run"))
    assert commit in text and '"max_steps": 8' in text


def test_the_offline_wandb_run_holds_the_config_and_the_history(reported: tuple[Job, str]) -> None:
    job, commit = reported
    (run_id, config, history), = wandb_runs(job.root / "run")
    assert config["git_commit"] == commit and config["config"]["training"]["max_steps"] == 8
    assert "torch" in config["versions"]
    _close(history, jsonl_scalars(job.root / "run"))
    state = json.loads(sorted((job.root / "run" / "checkpoints").glob("step-*"))[-1].joinpath(
        "run_state.json").read_text())
    assert state["report_runs"]["wandb"] == run_id


def test_the_mlflow_run_holds_the_params_and_the_metric_histories(reported: tuple[Job, str]) -> None:
    job, commit = reported
    (run, histories), = mlflow_runs(job.root / "run")
    params = run.data.params
    assert params["git_commit"] == commit and params["config.training.max_steps"] == "8"
    assert json.loads(params["config.training.report_to"]) == JOB["report_to"]
    assert run.info.status == "FINISHED"
    _close(histories, jsonl_scalars(job.root / "run"))


def test_a_backend_that_is_not_installed_is_one_line_before_the_model_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    assert main(["train", "--set", f"output_dir={tmp_path / 'run'}", "--set",
                 "model.name_or_path=/no/such/model", "--set", "training.report_to=[wandb]"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith("training.report_to: wandb needs wandb, not installed here: pip install "
                         "'deltadist[track]', or remove wandb from training.report_to.")
    assert main(["train", "--set", "training.report_to=[comet]"]) == 2
    assert "training.report_to: 'comet' is not one of jsonl, tensorboard, wandb, mlflow." in \
        capsys.readouterr().err


KILL_IN_STEP_7 = """
    import time
    real_step = steps.StepRunner.train_step
    def train_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 7:
            time.sleep(2)  # W&B writes its run file every second
            die()
        return real_step(self, batch)
    steps.StepRunner.train_step = train_step
"""
"""Dies in step 7, two seconds after the checkpoint of step 6 (a kill during a step)."""


def steps_of(histories: dict[str, list[tuple[int, float]]]) -> dict[str, list[int]]:
    return {key: [step for step, _ in points] for key, points in histories.items()}


@pytest.mark.slow
def test_a_killed_run_resumes_the_same_runs_without_a_step_twice(
        reported: tuple[Job, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean_environment(monkeypatch)
    job = make_job(tmp_path, "causal_lm", family="llama", **JOB)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # Its own W&B service, as a job started anew has (this process's would outlive the kill).
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "PYTHONPATH": path}
    killed = subprocess.run([sys.executable, "-c", killing_script(job, KILL_IN_STEP_7)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    (first_wandb, _, killed_history), = wandb_runs(job.root / "run")
    assert steps_of(killed_history)["loss"] == [1, 2, 3, 4, 5, 6]  # reported up to the checkpoint
    (first_mlflow, _), = mlflow_runs(job.root / "run")
    assert main(["train", "--config", str(job.config), "--resume"]) == 0

    expected = jsonl_scalars(reported[0].root / "run")  # the uninterrupted run's
    _close(tensorboard_scalars(job.root / "run")[0], jsonl_scalars(job.root / "run"))
    runs = wandb_runs(job.root / "run")
    assert [run_id for run_id, _, _ in runs] == [first_wandb] * 2  # the same run, continued
    history: dict[str, list[tuple[int, float]]] = {}
    for _, _, part in runs:
        for key, points in part.items():
            history.setdefault(key, []).extend(points)
    assert steps_of(history) == steps_of(expected)
    (run, histories), = mlflow_runs(job.root / "run")
    assert run.info.run_id == first_mlflow.info.run_id and run.info.status == "FINISHED"
    assert steps_of(histories) == steps_of(expected)
    for key in ("loss", "eval_loss", "grad_norm"):  # resumed bit for bit: the same numbers
        assert [v for _, v in histories[key]] == pytest.approx([v for _, v in expected[key]], rel=1e-6)
