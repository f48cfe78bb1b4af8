"""``deltadist train`` on data from where it lives: a dataset in the local datasets cache (read
offline, in a fresh process), a ``save_to_disk`` folder, columns under the user's names, several
sources mixed by weight, and a file streamed row by row -- trained, described by the dry run, and
resumed after a kill bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from deltadist.cli.main import main
from deltadist.training import run_state
from tests.source_jobs import mixed_job, read_rows, renamed, streamed_job, with_data
from tests.task_jobs import make_job
from tests.text_tasks import cache_dataset

REPO = Path(__file__).resolve().parents[2]


def _delta(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "delta" / "delta.safetensors"))


def test_a_cached_dataset_name_trains_offline_in_a_fresh_process(tmp_path: Path) -> None:
    """The name resolves through datasets' own offline path (HF_HUB_OFFLINE=1 before it is
    imported), its columns mapped; the evaluation rows are a saved DatasetDict's validation split."""
    job = make_job(tmp_path, "causal_lm", epochs=2)
    home = tmp_path / "hf-home"
    cache_dataset(home / "datasets", "user/reverse", {"train": renamed(read_rows(job.train))})
    splits = {"train": read_rows(job.train)[:4], "validation": read_rows(job.eval)}
    datasets.DatasetDict({name: datasets.Dataset.from_list(renamed(rows))
                          for name, rows in splits.items()}).save_to_disk(tmp_path / "saved")
    with_data(job, {"train": "user/reverse", "eval": str(tmp_path / "saved"),
                    "columns": {"prompt": "question", "completion": "answer"}})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    script = ("from deltadist.cli.main import main; "
              f"raise SystemExit(main(['train', '--config', {str(job.config)!r}]))")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((job.root / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 16  # 64 rows, 8 a step, 2 epochs: the cached train split
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.05, metrics


def test_mixed_sources_train_and_the_dry_run_shows_each_share(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    job = mixed_job(tmp_path, epochs=2)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["train", "--config", str(job.config), "--dry-run"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the table's padding aside
    assert f"source 0 │ {tmp_path / 'renamed.jsonl'} (question as prompt, answer as completion): 40 rows, " \
           "16 examples an epoch (25.0%)" in out
    assert f"source 1 │ {tmp_path / 'saved'}: 16 rows, 32 examples an epoch (50.0%)" in out
    assert f"source 2 │ {tmp_path / 'tail.jsonl'}: 8 rows, 16 examples an epoch (25.0%)" in out
    assert "16 steps (8 an epoch, 2 epochs)" in out
    assert main(["train", "--config", str(job.config)]) == 0
    metrics = json.loads((job.root / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 16 and metrics["eval_loss"] < metrics["eval_loss_before"] - 0.05, metrics


def test_streamed_files_train_for_max_steps_and_the_run_evaluates(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    job = streamed_job(tmp_path, max_steps=10, lr=0.02)
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["train", "--config", str(job.config), "--dry-run"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"streamed from {tmp_path / 'renamed.jsonl'} in file order: 80 rows read over the run" in out
    assert "10 steps (10 an epoch, max_steps 10)" in out
    shuffled = streamed_job(tmp_path / "shuffled", shards=3, shuffle_buffer=16, max_steps=10, lr=0.01)
    assert main(["train", "--config", str(shuffled.config), "--dry-run"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    pattern = tmp_path / "shuffled" / "renamed-*.jsonl"
    assert f"streamed from {pattern} shuffled through a buffer of 16 rows: 80 rows read over the run" in out
    assert main(["train", "--config", str(shuffled.config)]) == 0
    metrics = json.loads((shuffled.root / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 10 and metrics["eval_loss"] < metrics["eval_loss_before"] - 0.05, metrics
    # The day after: its evaluation rows (under the run's column names) give the run's final loss.
    scores = tmp_path / "eval.json"
    rows = ["--data", str(shuffled.root / "renamed_eval.jsonl")]
    assert main(["eval", "--run", str(shuffled.root / "run"), *rows, "--output", str(scores)]) == 0
    assert json.loads(scores.read_text())["loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)


KILL_AT_STEP_7 = """
import os, signal
from deltadist.training import steps
calls = {"n": 0}
real_step = steps.StepRunner.train_step
def train_step(self, batch):
    calls["n"] += 1
    if calls["n"] == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, batch)
steps.StepRunner.train_step = train_step
from deltadist.cli.main import main
main(["train", "--config", %r])
raise SystemExit("not killed")
"""


@pytest.mark.slow
@pytest.mark.parametrize("data", ["mixed", "streamed"])
def test_a_killed_run_resumes_to_the_uninterrupted_delta(data: str, tmp_path: Path) -> None:
    """16 steps (the streamed files, shuffled, wrap around after 8), killed during step 7, resumed
    from step 6."""
    training = {"save_every": 3, "warmup_steps": 2, "scheduler": "cosine"}
    make = mixed_job if data == "mixed" else streamed_job
    training.update({"epochs": 2} if data == "mixed" else {"max_steps": 16, "shards": 2, "shuffle_buffer": 8})
    whole = make(tmp_path / "whole", **training)
    assert main(["train", "--config", str(whole.config)]) == 0
    job = make(tmp_path / "killed", **training)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    killed = subprocess.run([sys.executable, "-c", KILL_AT_STEP_7 % str(job.config)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [s for s, _ in run_state.checkpoints(job.root / "run")][-1] == 6
    assert main(["train", "--config", str(job.config), "--resume"]) == 0
    expected, got = _delta(whole.root / "run"), _delta(job.root / "run")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    logged = [json.loads(line) for line in (job.root / "run" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (whole.root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in logged] == [r.get("loss") for r in reference]
