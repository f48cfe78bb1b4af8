"""The job's guards, unit by unit: a step with a non-finite loss or gradient is not taken, and
the job stops (or skips it, up to a limit); damaged checkpoint files are recognised; the metrics log
keeps what a checkpoint counted; output_dir and warm-up are checked before the model matters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from deltadist.engines.runtime import EngineSetup
from deltadist.errors import ConfigError, TrainingError
from deltadist.training import run_state
from deltadist.training.batching import Collator, plan_steps
from deltadist.training.checks import check_writable, warn_if_warmup_outlasts
from deltadist.training.config import MAX_NONFINITE_SKIPS, TrainingConfig, load_config
from deltadist.training.metrics import MetricsLog
from deltadist.training.steps import NonFiniteSteps, StepOutcome, prepare_steps
from deltadist.training.text_data import TokenizedExample


class Tiny(nn.Module):
    """Token ids -> mean embedding -> two class logits: a model the loop can step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(8, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids).mean(dim=1))


class HeadAsDelta:
    """What the steps ask of a delta, for a plain module: its parameters in one group."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def param_groups(self, lr: float, loraplus_lr_ratio: float = 1.0) -> list[dict]:
        return [{"params": list(self.module.parameters()), "lr": lr}]


def _runner(max_grad_norm: float | None = None):
    model = Tiny()
    training = TrainingConfig(batch_size=2, lr=0.1, max_grad_norm=max_grad_norm, warmup_steps=3)
    plan = plan_steps(2, None, None, 1, 4, 1, None)
    engine = EngineSetup(name="plain", device=torch.device("cpu"), wrap=lambda m: m)
    steps = prepare_steps(engine, model, HeadAsDelta(model.head), training, plan, "sequence_classification",
                          torch.float32, Collator("sequence_classification", 0))
    return model, steps


BATCH = [TokenizedExample((1, 2, 3), (0,)), TokenizedExample((4, 5), (1,))]


@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_a_finite_step_is_taken_and_its_norm_known(max_grad_norm: float | None) -> None:
    model, steps = _runner(max_grad_norm)
    before = model.head.weight.detach().clone()
    outcome = steps.train_step(BATCH)
    assert outcome.finite and math.isfinite(outcome.loss) and outcome.grad_norm > 0
    assert outcome.tokens == 5
    assert not torch.equal(model.head.weight, before)
    assert steps.scheduler.last_epoch == 1


def test_unclipped_steps_are_the_plain_optimizer_steps_bit_for_bit() -> None:
    """Knowing the norm without clipping (clipping to infinity) leaves the gradients as they were."""
    model, steps = _runner()
    steps.train_step(BATCH)
    reference = Tiny()
    # the first step of a 3-step warm-up has 1/(3+1) of lr
    optimizer = torch.optim.AdamW(reference.head.parameters(), lr=0.1 / 4, weight_decay=0.0)
    inputs = Collator("sequence_classification", 0)(BATCH)
    labels = inputs.pop("labels")
    (nn.functional.cross_entropy(reference(**inputs), labels, reduction="sum") / 2).backward()
    optimizer.step()
    assert torch.equal(model.head.weight, reference.head.weight)
    assert torch.equal(model.head.bias, reference.head.bias)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_nonfinite_step_is_not_taken(where: str) -> None:
    model, steps = _runner()
    steps.train_step(BATCH)
    before = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
    optimizer_state = json.dumps(str(steps.stepper.state_dict()))
    if where == "loss":
        model.head.bias.data[0] = math.nan  # the forward gives nan
        before["bias"] = model.head.bias.detach().clone()
    else:  # a finite loss whose gradient overflows
        model.head.weight.register_hook(lambda grad: grad * math.inf)
    outcome = steps.train_step(BATCH)
    assert not outcome.finite
    assert math.isfinite(outcome.loss) == (where == "gradient")
    assert all(p.grad is None for p in model.head.parameters())  # dropped
    for key, value in model.head.state_dict().items():
        assert torch.equal(value, before[key]) or torch.isnan(value).any(), key
    assert json.dumps(str(steps.stepper.state_dict())) == optimizer_state
    assert steps.scheduler.last_epoch == 1  # did not step


def _bad(step_loss: float = math.nan) -> StepOutcome:
    return StepOutcome(step_loss, 10, math.nan, finite=False)


def test_without_skipping_a_nonfinite_step_stops_the_job_naming_it(tmp_path: Path) -> None:
    guard = NonFiniteSteps(False, tmp_path, True)
    assert guard.check(3, StepOutcome(1.0, 10, 1.0, finite=True)) is False
    with pytest.raises(TrainingError, match=r"training step 4: the loss is nan and the gradient norm nan .*"
                                            r"no checkpoint was written.*skip_nonfinite_steps: true"):
        guard.check(4, _bad())


def test_skipping_warns_and_stops_after_the_limit_in_a_row(tmp_path: Path) -> None:
    guard = NonFiniteSteps(True, tmp_path, True)
    with pytest.warns(UserWarning, match="training step 2: the loss is inf .*skipped it"):
        assert guard.check(2, _bad(math.inf)) is True
    assert guard.check(3, StepOutcome(1.0, 10, 1.0, finite=True)) is False  # the count starts again
    with pytest.warns(UserWarning):
        for step in range(4, 4 + MAX_NONFINITE_SKIPS - 1):
            assert guard.check(step, _bad()) is True
    with pytest.raises(TrainingError, match=f"step {3 + MAX_NONFINITE_SKIPS}: .*{MAX_NONFINITE_SKIPS} "
                                            "non-finite steps in a row"):
        guard.check(3 + MAX_NONFINITE_SKIPS, _bad())


@pytest.mark.parametrize("item", ["training.lr=.inf", "training.lr=nan", "training.lr=-.inf",
                                  "training.weight_decay=.nan", "training.max_grad_norm=inf",
                                  "delta.lora_alpha=.nan"])
def test_nonfinite_numbers_in_the_config_are_refused(item: str) -> None:
    key = item.partition("=")[0]
    with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
        load_config(overrides=[item])


def test_skip_nonfinite_steps_may_change_on_resume() -> None:
    assert "training.skip_nonfinite_steps" in run_state.RESUMABLE_DIFFERENCES


# -- damaged checkpoint files -----------------------------------------------------------------------

def _state() -> run_state.RankState:
    return run_state.RankState({"state": {0: {"exp_avg": torch.arange(6.0)}}}, {"last_epoch": 3}, None,
                               {"cpu": torch.get_rng_state()})


def test_a_rank_file_reads_back_and_a_truncated_or_altered_one_is_damaged(tmp_path: Path) -> None:
    run_state.write_rank_state(tmp_path, 0, 1, _state(), lambda t: t)
    path = tmp_path / run_state.rank_filename(0, 1)
    assert torch.equal(run_state.read_rank_state(tmp_path, 0, 1).optimizer["state"][0]["exp_avg"],
                       torch.arange(6.0))
    data = path.read_bytes()
    at = data.index(torch.arange(6.0).numpy().tobytes())
    path.write_bytes(data[:at + 4] + bytes(4) + data[at + 8:])  # 1.0 made 0.0 in place
    with pytest.raises(run_state.DamagedCheckpoint, match="is corrupt .*SHA-256"):
        run_state.read_rank_state(tmp_path, 0, 1)
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(run_state.DamagedCheckpoint, match=f"{path} is truncated or corrupt"):
        run_state.read_rank_state(tmp_path, 0, 1)


@pytest.mark.parametrize(("text", "problem"), [
    ('{"format_version": 1, "step"', "is truncated or corrupt"),
    ('{"format_version": 1}', "is corrupt (it lacks step, tokens, engine, world_size, config)"),
])
def test_a_truncated_run_state_is_damaged(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / run_state.STATE_NAME).write_text(text)
    with pytest.raises(run_state.DamagedCheckpoint, match=problem.replace("(", r"\(").replace(")", r"\)")):
        run_state.read_run_state(tmp_path)


# -- the metrics log ----------------------------------------------------------------------------------

def test_the_log_keeps_the_rows_a_checkpoint_counted(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl", True)
    for row in [{"step": 0, "eval_loss": 2.0}, {"step": 1, "loss": 1.5}, {"step": 2, "loss": 1.0}]:
        log.write(row)
    counted = log.rows
    log.write({"step": 2, "eval_loss": 0.9})  # the final evaluation, after the checkpoint of step 2
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 3, "lo')  # a line cut off by a kill
    resumed = MetricsLog(tmp_path / "metrics.jsonl", True)
    resumed.truncate_after(2, counted)
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        [{"step": 0, "eval_loss": 2.0}, {"step": 1, "loss": 1.5}, {"step": 2, "loss": 1.0}]
    assert resumed.rows == 3
    resumed.write({"step": 3, "loss": 0.5})
    old = MetricsLog(tmp_path / "metrics.jsonl", True)  # a checkpoint without the count: by step
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 4, "lo')
    old.truncate_after(3)
    assert old.rows == 4


# -- before the model loads -------------------------------------------------------------------------

def test_an_output_dir_that_cannot_be_written_is_a_config_error(tmp_path: Path) -> None:
    check_writable(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"output_dir: .*file/run cannot be written \(.*\); choose"):
        check_writable(tmp_path / "file" / "run")


def test_a_warmup_longer_than_the_run_warns_naming_both(recwarn: pytest.WarningsRecorder) -> None:
    warn_if_warmup_outlasts(5, 6)
    assert not recwarn.list
    with pytest.warns(UserWarning, match=r"warmup_steps \(20\) .* \(6 optimizer steps\).* only 29% of"):
        warn_if_warmup_outlasts(20, 6)
    with pytest.warns(UserWarning, match=r"\(6\) .* \(6 optimizer steps\)"):
        warn_if_warmup_outlasts(6, 6)
