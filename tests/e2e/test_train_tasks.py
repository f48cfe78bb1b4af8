"""``deltadist train`` on the user's own checkpoint and rows: each task learns, saves only the delta,
reloads to the logged eval loss, resumes after a kill to the uninterrupted delta, and bad input is
one line before training starts.

Every job is a tiny random-weight checkpoint written with ``save_pretrained`` and a word-level
tokenizer trained on JSON Lines rows (``tests/task_jobs.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from deltadist import AutoDeltaModel
from deltadist.cli.main import main
from deltadist.training import run_state
from deltadist.training.batching import Collator, global_batches, loss_units, micro_batches
from deltadist.training.config import TrainConfig, from_dict, keys_help, load_config, to_dict
from deltadist.training.job_data import load_rows, tokenize
from deltadist.training.model import load_model
from deltadist.training.objectives import summed_loss
from tests.task_jobs import Job, make_job, write_jsonl
from tests.text_tasks import word_tokenizer

REPO = Path(__file__).resolve().parents[2]
AUTO = {"causal_lm": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM,
        "sequence_classification": AutoModelForSequenceClassification}


def run_cli(config: Path, *extra: str) -> int:
    return main(["train", "--config", str(config), *extra])


def metrics(job: Job) -> dict:
    return json.loads((job.root / "run" / "metrics.json").read_text())


def log_rows(job: Job) -> list[dict]:
    return [json.loads(line) for line in (job.root / "run" / "metrics.jsonl").read_text().splitlines()]


def delta_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "delta.safetensors"))


@pytest.fixture(scope="module", params=["causal_lm", "seq2seq", "sequence_classification"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Job:
    job = make_job(tmp_path_factory.mktemp(request.param), request.param, save_every=4)
    assert run_cli(job.config) == 0
    return job


def test_each_task_learns(trained: Job) -> None:
    result = metrics(trained)
    assert result["eval_loss"] < result["eval_loss_before"] - 0.05, result
    if result["task"] == "sequence_classification":
        assert result["accuracy_after"] > result["accuracy_before"] + 0.2, result
    assert result["steps"] == 24 and result["tokens"] > 0 and result["tokens_per_second"] > 0


def test_metrics_log_has_step_loss_lr_throughput_and_eval(trained: Job) -> None:
    rows = log_rows(trained)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 25))
    assert all({"epoch", "lr", "tokens", "tokens_per_s"} <= set(r) for r in steps)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 24]
    assert evals[-1]["eval_loss"] == pytest.approx(metrics(trained)["eval_loss"], rel=1e-5)


def test_checkpoints_hold_only_the_delta_and_the_new_head(trained: Job) -> None:
    saved = run_state.checkpoints(trained.root / "run")
    assert [step for step, _ in saved] == [4, 8, 12, 16, 20, 24]
    head = ("classifier",) if metrics(trained)["task"] == "sequence_classification" else ()
    written = {p.name for p in (trained.root / "run").rglob("*") if p.is_file()}
    assert written == {"delta.safetensors", "delta_config.json", "rank-00000-of-00001.safetensors",
                       "run_state.json", "metrics.json", "metrics.jsonl", "config.yaml"}
    # The resolved config (what deltadist predict --run reads) is the job's, class names filled in.
    resolved = to_dict(load_config(trained.root / "run" / "config.yaml"))
    expected = to_dict(load_config(trained.config))
    if head:
        assert resolved["data"].pop("labels") == ["bad", "good"] and expected["data"].pop("labels") is None
    assert resolved == expected
    for directory in [trained.root / "run" / "delta", saved[-1][1] / "delta"]:
        keys = delta_tensors(directory)
        assert keys and all("lora_" in k or k.startswith(head) for k in keys), sorted(keys)
        assert not head or any(k.startswith("classifier") for k in keys)
    backbone_bytes = sum(p.stat().st_size for p in trained.model.glob("*.safetensors"))
    assert metrics(trained)["delta_bytes"] < backbone_bytes


def test_the_final_delta_reloads_onto_the_base_checkpoint_to_the_logged_eval_loss(trained: Job) -> None:
    cfg = load_config(trained.config)
    rows = load_rows(cfg)
    auto = AUTO[cfg.task]
    extra = {"num_labels": len(rows.labels)} if rows.labels else {}
    model = auto.from_pretrained(trained.model, **extra).eval()
    AutoDeltaModel.from_finetuned(trained.root / "run" / "delta", backbone_model=model)
    from transformers import AutoTokenizer

    data = tokenize(rows, cfg, AutoTokenizer.from_pretrained(trained.model))
    collate = Collator(cfg.task, 0, getattr(model.config, "decoder_start_token_id", None))
    total = 0.0
    with torch.no_grad():
        for batch in global_batches(data.eval, range(len(data.eval)), 16):
            micro, = micro_batches(batch, cfg.task, collate, 0, 1, 1)
            total += float(summed_loss(cfg.task, model, micro.inputs)[0])
    reloaded = total / sum(loss_units(cfg.task, e) for e in data.eval)
    assert reloaded == pytest.approx(metrics(trained)["eval_loss"], rel=1e-5)


# -- kill and resume --------------------------------------------------------------------------------

RESUME_JOB = {"epochs": 2, "save_every": 3, "warmup_steps": 2, "scheduler": "cosine"}
"""16 steps, checkpoints at 3, 6, ..., 15; warm-up and cosine decay, so the scheduler state matters."""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Job:
    job = make_job(tmp_path_factory.mktemp("whole"), "causal_lm", family="llama", **RESUME_JOB)
    assert run_cli(job.config) == 0
    return job


def resumable_copy(reference: Job, root: Path, **training: object) -> Job:
    """The reference job (checkpoint, rows, config) with an output_dir of its own under ``root``
    (and ``training`` keys changed: those a resumed run may change)."""
    config = {**reference.config_dict(), "output_dir": str(root / "run")}
    config["training"] = {**config["training"], **training}
    (root / "job.yaml").write_text(yaml.safe_dump(config))
    return Job(root, reference.model, reference.train, reference.eval, root / "job.yaml")


def killing_script(job: Job, patch: str) -> str:
    """Python that runs the job in this process after ``patch`` and dies by SIGKILL inside it."""
    return textwrap.dedent(f"""
        import os, signal
        from deltadist.training import run_state, steps
        calls = {{"n": 0}}
        def die():
            os.kill(os.getpid(), signal.SIGKILL)
        {textwrap.indent(textwrap.dedent(patch), '        ').strip()}
        from deltadist.cli.main import main
        main(["train", "--config", {str(job.config)!r}])
        raise SystemExit("not killed")
    """)


KILL_POINTS = {
    # after step 7's forward and backward, before its optimizer step (the newest checkpoint is step 6)
    "mid_step": """
        real_step = steps.StepRunner.train_step
        def train_step(self, batch):
            calls["n"] += 1
            if calls["n"] == 7:
                self.runner(**{k: v for k, v in self.collate(batch).items() if k != "labels"})
                die()
            return real_step(self, batch)
        steps.StepRunner.train_step = train_step
    """,
    # while writing the checkpoint of step 9: the rank file is written, run_state.json is not
    "mid_checkpoint": """
        real_write = run_state.write_rank_state
        def write_rank_state(directory, *args):
            real_write(directory, *args)
            calls["n"] += 1
            if calls["n"] == 3:
                die()
        run_state.write_rank_state = write_rank_state
    """,
    # while writing the final delta (half its file written), after the final evaluation was logged;
    # the job checkpoints every 4 steps, so the newest checkpoint is the final step's
    "final_delta": """
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith(os.path.join("run", "delta", "delta.safetensors")):
                os.truncate(src, os.path.getsize(src) // 2)
                die()
            real_replace(src, dst)
        os.replace = replace
    """,
}
KILL_SAVE_EVERY = {"mid_step": 3, "mid_checkpoint": 3, "final_delta": 4}


@pytest.mark.parametrize("moment", KILL_POINTS)
def test_a_killed_run_resumes_to_the_uninterrupted_delta(
        moment: str, uninterrupted: Job, tmp_path: Path) -> None:
    job = resumable_copy(uninterrupted, tmp_path, save_every=KILL_SAVE_EVERY[moment])
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    killed = subprocess.run([sys.executable, "-c", killing_script(job, KILL_POINTS[moment])], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    newest = {"mid_step": 6, "mid_checkpoint": 6, "final_delta": 16}[moment]
    assert [s for s, _ in run_state.checkpoints(job.root / "run")][-1] == newest
    assert not (job.root / "run" / "delta" / "delta.safetensors").exists()
    assert run_cli(job.config, "--resume") == 0
    for name, tensor in delta_tensors(uninterrupted.root / "run" / "delta").items():
        assert torch.equal(delta_tensors(job.root / "run" / "delta")[name], tensor), name
    expected = [r for r in log_rows(uninterrupted)]
    got = log_rows(job)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    measured = ("tokens_per_s", "peak_memory_bytes")  # of the process, not of the training
    for a, b in zip(got, expected):
        assert {k: v for k, v in a.items() if k not in measured} == \
            {k: v for k, v in b.items() if k not in measured}
    assert metrics(job)["resumed_from"] == newest
    assert not list((job.root / "run" / "checkpoints").glob(".*partial"))
    assert not list((job.root / "run" / "delta").glob(".*.tmp"))  # the killed save's temporary file


def test_resume_from_an_earlier_checkpoint_after_deleting_the_later_ones(
        uninterrupted: Job, tmp_path: Path) -> None:
    job = resumable_copy(uninterrupted, tmp_path)
    shutil.copytree(uninterrupted.root / "run", job.root / "run")
    for step, directory in run_state.checkpoints(job.root / "run"):
        if step > 3:
            shutil.rmtree(directory)
    shutil.rmtree(job.root / "run" / "delta")
    (job.root / "run" / "checkpoints" / ".step-00000006.partial").mkdir()  # a half-written one
    assert run_cli(job.config, "--resume") == 0
    assert metrics(job)["resumed_from"] == 3
    for name, tensor in delta_tensors(uninterrupted.root / "run" / "delta").items():
        assert torch.equal(delta_tensors(job.root / "run" / "delta")[name], tensor), name


def test_resume_guards(uninterrupted: Job, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = resumable_copy(uninterrupted, tmp_path)
    shutil.copytree(uninterrupted.root / "run", job.root / "run")
    assert run_cli(job.config) == 2  # checkpoints there, no --resume
    assert "holds checkpoints of an earlier run (the newest after step 15): pass --resume" in \
        capsys.readouterr().err
    assert run_cli(job.config, "--resume", "--set", "training.lr=0.5") == 2
    assert "training.lr: 0.01 there, 0.5 now" in capsys.readouterr().err
    fresh = make_job(tmp_path / "fresh", "causal_lm", family="llama", epochs=1, keep_last=2, save_every=1)
    assert run_cli(fresh.config, "--resume") == 0  # nothing to resume: starts at step 0
    assert "no checkpoint" in capsys.readouterr().err
    assert [s for s, _ in run_state.checkpoints(fresh.root / "run")] == [7, 8]


# -- the workflows around it --------------------------------------------------------------------------

def test_gradient_accumulation_trains_the_same_delta(tmp_path: Path) -> None:
    whole = make_job(tmp_path / "whole", "causal_lm", epochs=1)
    split = make_job(tmp_path / "split", "causal_lm", epochs=1, micro_batch_size=2)
    assert run_cli(whole.config) == 0 and run_cli(split.config) == 0
    for name, tensor in delta_tensors(whole.root / "run" / "delta").items():
        torch.testing.assert_close(delta_tensors(split.root / "run" / "delta")[name], tensor,
                                   rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_trains_the_same_delta(tmp_path: Path) -> None:
    plain = make_job(tmp_path / "plain", "causal_lm", epochs=1)
    checkpointed = make_job(tmp_path / "ckpt", "causal_lm", epochs=1)
    config = checkpointed.config_dict()
    config["model"]["gradient_checkpointing"] = True
    checkpointed.config.write_text(yaml.safe_dump(config))
    loaded = load_model(load_config(checkpointed.config).model, "causal_lm", None, 0, torch.float32)
    on = getattr(loaded.model, "is_activation_checkpointing", None)  # transformers 5; 4.x: the old name
    assert on if on is not None else loaded.model.is_gradient_checkpointing
    assert run_cli(plain.config) == 0 and run_cli(checkpointed.config) == 0
    for name, tensor in delta_tensors(plain.root / "run" / "delta").items():
        torch.testing.assert_close(delta_tensors(checkpointed.root / "run" / "delta")[name], tensor)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_half_precision_backbone_trains_fp32_deltas(dtype: str, tmp_path: Path) -> None:
    """Under autocast; fp16 with a gradient scaler."""
    job = make_job(tmp_path, "causal_lm", lr=0.02)
    assert run_cli(job.config, "--set", f"model.dtype={dtype}") == 0
    result = metrics(job)
    assert result["eval_loss"] < result["eval_loss_before"] - 0.05, result
    assert {t.dtype for t in delta_tensors(job.root / "run" / "delta").values()} == {torch.float32}


WIDE = {"hidden_size": 256, "intermediate_size": 512}
"""Rows of 256 values: NF4 blocks of 64 fit (the usual tiny width, 32, stays in full precision)."""


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_an_nf4_backbone_trains_the_delta_and_a_new_head(task: str, tmp_path: Path) -> None:
    """A Llama read into 4 bits from its base checkpoint; as a classifier, a new score head."""
    pytest.importorskip("torchao")
    from deltadist.core.quantized import is_quantized

    job = make_job(tmp_path, task, family="llama", model_config=WIDE, lr=0.02)
    cfg = load_config(job.config, ["model.quantize=nf4"])
    labels = ["bad", "good"] if task == "sequence_classification" else None
    loaded = load_model(cfg.model, task, labels, 0, torch.float32)
    quantized = [n for n, p in loaded.model.named_parameters() if is_quantized(p)]
    assert len(quantized) == 2 * 7, quantized  # every projection of the 2 blocks, not the heads
    assert loaded.new_modules == (["score"] if labels else [])
    assert run_cli(job.config, "--set", "model.quantize=nf4") == 0
    result = metrics(job)
    if task == "causal_lm":
        assert result["eval_loss"] < result["eval_loss_before"] - 0.05, result
    else:  # the new head is initialised, kept in full precision and trained with the delta
        assert result["accuracy_after"] > result["accuracy_before"] + 0.2, result
        assert any(k.startswith("score.") for k in delta_tensors(job.root / "run" / "delta"))


def test_packing_and_length_sorting_train(tmp_path: Path) -> None:
    job = make_job(tmp_path, "causal_lm", train_rows=128)
    assert run_cli(job.config, "--set", "data.packing=true", "--set", "data.sort_by_length=true") == 0
    result = metrics(job)
    assert result["eval_loss"] < result["eval_loss_before"] - 0.05, result
    # 128 whole rows of 9 tokens, 3 to a row of 32 tokens: 43 rows, 6 steps of 8 per epoch
    assert result["steps"] == 18


def test_packing_stops_a_model_whose_attention_lets_examples_see_each_other(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A Llama whose layers get no mask (plain causal attention over the whole row): the job's probe
    stops it before the first step, rather than train on examples that see each other."""
    from transformers.models.llama import modeling_llama

    job = make_job(tmp_path, "causal_lm")
    monkeypatch.setattr(modeling_llama, "create_causal_mask", lambda **kwargs: None)
    assert run_cli(job.config, "--set", "data.packing=true") == 2
    error = capsys.readouterr().err
    assert "data.packing: this model's attention does not keep packed examples apart" in error
    assert not (job.root / "run" / "metrics.jsonl").exists()


def test_chat_rows_train_on_the_assistant_turns(tmp_path: Path) -> None:
    job = make_job(tmp_path, "causal_lm", chat=True)
    cfg = load_config(job.config)
    data = tokenize(load_rows(cfg), cfg, AutoTokenizer.from_pretrained(job.model))  # the saved template
    # Each answer is three words and ChatML's <|im_end|>; the system and user turns add no loss.
    assert [sum(label != -100 for label in e.labels) for e in data.train] == [4] * 64
    assert run_cli(job.config) == 0
    result = metrics(job)
    assert result["eval_loss"] < result["eval_loss_before"] - 0.05, result


def test_a_decoder_classifier_trains_its_new_score_head(tmp_path: Path) -> None:
    job = make_job(tmp_path, "sequence_classification", family="llama")
    assert run_cli(job.config) == 0
    result = metrics(job)
    assert result["accuracy_after"] > result["accuracy_before"] + 0.2, result
    assert any(k.startswith("score.") for k in delta_tensors(job.root / "run" / "delta"))


def test_a_classifier_checkpoint_with_its_head_trains_that_head_by_default(tmp_path: Path) -> None:
    """As the library's default: the delta trains its own copy of the task head the checkpoint
    already has (it was frozen before: accuracy stayed where the random head put it)."""
    job = make_job(tmp_path, "sequence_classification")
    labels = sorted({json.loads(line)["label"] for line in job.train.read_text().splitlines()})
    torch.manual_seed(5)
    with_head = AutoModelForSequenceClassification.from_pretrained(job.model, num_labels=len(labels))
    with_head.save_pretrained(job.model)  # the same backbone, now with a (random) classifier
    head = with_head.classifier.weight.detach().clone()
    assert run_cli(job.config) == 0
    saved = delta_tensors(job.root / "run" / "delta")
    assert "classifier.weight" in saved and not torch.equal(saved["classifier.weight"], head)
    result = metrics(job)
    assert result["accuracy_after"] > result["accuracy_before"] + 0.2, result


@pytest.mark.parametrize(("shipped", "task"), [
    ("causal_lm_lora", "causal_lm"),
    pytest.param("seq2seq_lora", "seq2seq", marks=pytest.mark.slow),
    pytest.param("classification_lora", "sequence_classification", marks=pytest.mark.slow),
])
def test_the_shipped_task_configs_train_once_pointed_at_a_checkpoint(shipped: str, task: str,
                                                                     tmp_path: Path) -> None:
    job = make_job(tmp_path, task)
    overrides = {"model.name_or_path": job.model, "data.train": job.train, "data.eval": job.eval,
                 "output_dir": tmp_path / "run", "model.max_length": 32, "training.epochs": 2,
                 "training.batch_size": 8, "training.micro_batch_size": 4, "training.save_every": 4,
                 "training.eval_every": 4, "training.lr": 0.01, "training.warmup_steps": 2}
    argv = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    assert main(["train", "--config", str(REPO / "configs" / f"{shipped}.yaml"), *argv]) == 0
    result = metrics(job)
    assert result["task"] == task and result["eval_loss"] < result["eval_loss_before"], result
    assert [r["step"] for r in log_rows(job) if "eval_loss" in r] == [0, 4, 8, 12, 16]
    assert [s for s, _ in run_state.checkpoints(tmp_path / "run")] == [12, 16]  # keep_last: 2


def test_help_documents_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    flat = _keys(from_dict({}))
    assert len(flat) > 30
    for key in flat:
        assert f"  {key} (default " in out, key
    assert keys_help() in out


def _keys(cfg: TrainConfig) -> list[str]:
    from dataclasses import fields, is_dataclass

    def walk(node, prefix):
        for f in fields(node):
            value = getattr(node, f.name)
            yield from walk(value, f"{prefix}{f.name}.") if is_dataclass(value) else [f"{prefix}{f.name}"]

    return list(walk(cfg, ""))


# -- bad input ------------------------------------------------------------------------------------------

def _broken(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    """A job whose ``case`` is wrong, and the --set arguments that make it so."""
    if case == "classifier_on_a_model_without_one":
        tokenizer = word_tokenizer(["w0 w1 good bad"], template="$A")
        model = tmp_path / "codegen"
        from transformers import AutoConfig, AutoModelForCausalLM as Auto

        config = AutoConfig.for_model("codegen", n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=32,
                                      vocab_size=len(tokenizer))
        Auto.from_config(config).save_pretrained(model)
        tokenizer.save_pretrained(model)
        job = make_job(tmp_path / "job", "sequence_classification")
        return job.config, ["--set", f"model.name_or_path={model}"]
    if case == "base_model_without_lm_head":
        job = make_job(tmp_path, "causal_lm", head="base")
        return job.config, []
    if case == "seq2seq_on_a_decoder":
        job = make_job(tmp_path, "seq2seq", family="llama")
        return job.config, []
    if case == "chat_row_with_a_bad_role":
        job = make_job(tmp_path, "causal_lm", chat=True)
        write_jsonl(job.train, [{"messages": [{"role": "user", "content": "w1 ->"},
                                              {"role": "bot", "content": "w1"}]}])
        return job.config, []
    job = make_job(tmp_path, "causal_lm")
    if case == "missing_file":
        return job.config, ["--set", f"data.train={tmp_path / 'nope.jsonl'}"]
    if case == "rows_without_fields":
        write_jsonl(job.train, [{"prompt": "w1 ->", "completion": "w1"}, {"prompt": "w2 ->", "answer": "w2"}])
        return job.config, []
    if case == "empty":
        job.train.write_text("")
        return job.config, []
    if case == "bad_split":
        return job.config, ["--set", "training.micro_batch_size=3"]
    if case == "half_precision_fsdp1":  # a world of one: the engine starts without a launcher
        return job.config, ["--set", "engine=fsdp1", "--set", "model.dtype=bf16"]
    if case == "nf4_fsdp1":
        return job.config, ["--set", "engine=fsdp1", "--set", "model.quantize=nf4"]
    if case == "unknown_quantization":
        return job.config, ["--set", "model.quantize=int3"]
    raise AssertionError(case)


@pytest.mark.parametrize(("case", "message"), [
    ("missing_file", "data.train: .*nope.jsonl does not exist"),
    ("rows_without_fields", "row 2: .*completion"),
    ("chat_row_with_a_bad_role", "data.train: .*train.jsonl row 1 turn 2: role 'bot' is not one of"),
    ("empty", "data.train: .*train.jsonl"),
    ("classifier_on_a_model_without_one", "task: sequence_classification needs a sequence-classification "
                                          "head, but .* is a codegen model"),
    ("base_model_without_lm_head", "task: causal_lm trains through the language-model head, but .* holds "
                                   "no weights for it"),
    ("seq2seq_on_a_decoder", "task: seq2seq needs an encoder-decoder .* is a llama model"),
    ("bad_split", "not micro_batch_size x gradient_accumulation_steps"),
    ("half_precision_fsdp1", "model.dtype: bf16 does not work with engine fsdp1 .* set model.dtype: fp32"),
    ("nf4_fsdp1", "model.quantize: nf4 does not work with engine fsdp1 .*flattens.* engine: fsdp2"),
    ("unknown_quantization", "model.quantize.*int3.*nf4"),
])
def test_bad_input_is_one_line_before_training(case: str, message: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config, extra = _broken(tmp_path, case)
    assert run_cli(config, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("deltadist train: error: ")
    import re
    assert re.search(message, err[-1]), err[-1]
    assert not (Path(yaml.safe_load(config.read_text())["output_dir"]) / "checkpoints").exists()
    assert not (Path(yaml.safe_load(config.read_text())["output_dir"]) / "metrics.jsonl").exists()
