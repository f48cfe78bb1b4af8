"""``deltadist predict`` and ``deltadist eval`` on a run's directory (the built-in job's, a
classifier's, a causal LM's with prompt and chat rows) and on ``--model``/``--delta``: each row's
prediction equals what the trained model in memory predicts for it, computed here directly (argmax
of its logits, ``generate`` from the prompt's ids); ``eval`` on the job's own eval rows gives the
job's final metrics; bad input is one ``error:`` line."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from deltadist.cli.main import main
from deltadist.training.config import load_config
from deltadist.training.loop import train
from tests.task_jobs import make_job
from tests.text_tasks import write_jsonl

BUILTIN = ["data.train_size=48", "data.test_size=16", "training.batch_size=16"]


def _status(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def _cli(argv: list[str]) -> tuple[int, list[dict], str]:
    """``deltadist ARGV``'s status, stdout's JSON Lines and stderr."""
    status, out, err = _status(argv)
    return status, [json.loads(line) for line in out.splitlines()], err


def _greedy(model: torch.nn.Module, ids: list[int], eos: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=8, do_sample=False, pad_token_id=eos, eos_token_id=eos)
    return out[0, len(ids):].tolist()


def test_the_builtin_jobs_run_predicts_its_topics(tmp_path: Path) -> None:
    cfg = load_config(None, [*BUILTIN, f"output_dir={tmp_path / 'run'}"])
    result = train(cfg)
    sentences = ["The referee showed a red card in the final.", "Bake the bread dough at a high heat."]
    write_jsonl(tmp_path / "rows.jsonl", [{"text": s, "id": i} for i, s in enumerate(sentences)])
    status, rows, err = _cli(["predict", "--run", str(tmp_path / "run"),
                              "--input", str(tmp_path / "rows.jsonl")])
    assert status == 0, err
    tokenizer = AutoTokenizer.from_pretrained(result.model.encoder.name_or_path)
    encoded = tokenizer(sentences, padding=True, truncation=True, max_length=cfg.model.max_length,
                        return_tensors="pt")
    with torch.no_grad():
        probabilities = result.model.eval()(encoded["input_ids"], encoded["attention_mask"]).softmax(-1)
    labels = load_config(tmp_path / "run" / "config.yaml").data.labels
    assert [r["id"] for r in rows] == [0, 1]  # the input rows, in order
    assert [r["prediction"] for r in rows] == [labels[i] for i in probabilities.argmax(-1).tolist()]
    assert [r["score"] for r in rows] == pytest.approx(probabilities.max(-1).values.tolist(), abs=1e-5)

    # deltadist eval on labelled rows: the accuracy of those predictions.
    topics = ["sports", "cooking"]
    write_jsonl(tmp_path / "labelled.jsonl", [{"text": s, "label": t} for s, t in zip(sentences, topics)])
    status, _, err = _status(["eval", "--run", str(tmp_path / "run"), "--data",
                              str(tmp_path / "labelled.jsonl"), "--output", str(tmp_path / "eval.json")])
    right = sum(r["prediction"] == t for r, t in zip(rows, topics)) / 2
    assert status == 0 and json.loads((tmp_path / "eval.json").read_text())["accuracy"] == right, err


def test_a_causal_lm_run_generates_from_prompts_and_chat_rows(tmp_path: Path) -> None:
    job = make_job(tmp_path / "lm", "causal_lm")  # 3 epochs: it answers with words, not only eos
    result = train(load_config(job.config))
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    prompts = [json.loads(line)["prompt"] for line in job.eval.read_text().splitlines()[:3]]
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    status, rows, err = _cli(["predict", "--run", str(job.root / "run"), "--input",
                              str(tmp_path / "prompts.jsonl"), "--max-new-tokens", "8", "--batch-size", "2"])
    assert status == 0, err
    model = result.model.eval()
    assert any(row["prediction"] for row in rows)  # text was generated, not only an end token
    for prompt, row in zip(prompts, rows):
        ids = _greedy(model, tokenizer(prompt)["input_ids"], tokenizer.eos_token_id)
        cut = ids.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in ids else len(ids)
        assert row["prediction"] == tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()

    # The same delta through --model/--delta (a causal LM checkpoint: the task from its class).
    status, again, err = _cli(["predict", "--model", str(job.model), "--delta",
                               str(job.root / "run" / "delta"), "--input", str(tmp_path / "prompts.jsonl"),
                               "--max-new-tokens", "8"])
    assert status == 0, err
    assert [r["prediction"] for r in again] == [r["prediction"] for r in rows]


def test_a_chat_run_answers_the_last_user_turn(tmp_path: Path) -> None:
    job = make_job(tmp_path / "chat", "causal_lm", chat=True, epochs=1)
    result = train(load_config(job.config))
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    chats = [json.loads(line) for line in job.eval.read_text().splitlines()[:2]]
    status, rows, err = _cli(["predict", "--run", str(job.root / "run"), "--input", str(job.eval),
                              "--max-new-tokens", "8", "--output", str(tmp_path / "out.jsonl")])
    assert status == 0 and rows == [], err
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(written) == len(job.eval.read_text().splitlines())
    for chat, row in zip(chats, written):
        roles = {"human": "user", "gpt": "assistant", "system": "system"}
        turns = chat.get("messages") or [{"role": roles[turn["from"]], "content": turn["value"]}
                                         for turn in chat["conversations"]]
        text = tokenizer.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True)
        ids = _greedy(result.model.eval(), tokenizer(text, add_special_tokens=False)["input_ids"],
                      tokenizer.eos_token_id)
        special = set(tokenizer.all_special_ids) - {tokenizer.pad_token_id}
        cut = next((i for i, token in enumerate(ids) if token in special), len(ids))
        assert row["prediction"] == tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()


def test_bad_input_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    write_jsonl(tmp_path / "rows.jsonl", [{"text": "x"}])
    for argv, problem in [
        (["--run", str(tmp_path / "run")], "not a finished deltadist train run"),
        (["--model", str(tmp_path)], "--model and --delta go together"),
    ]:
        status, _, err = _cli(["predict", *argv, "--input", str(tmp_path / "rows.jsonl")])
        assert status == 2 and err.count("\n") == 1 and problem in err, err


def test_eval_gives_the_jobs_metrics_on_other_rows(tmp_path: Path) -> None:
    """``deltadist eval --run`` on the job's own eval rows gives the final evaluation the job
    reported (confusion matrix included); on other rows, other numbers."""
    job = make_job(tmp_path / "cls", "sequence_classification", epochs=1)
    result = train(load_config(job.config))
    out = tmp_path / "eval.json"
    status, printed, err = _status(["eval", "--run", str(job.root / "run"), "--data", str(job.eval),
                                    "--output", str(out)])
    assert status == 0 and "macro_f1" in printed and "true / predicted" in printed, err
    found = json.loads(out.read_text())
    assert found["accuracy"] == pytest.approx(result.metrics.accuracy_after)
    assert found["loss"] == pytest.approx(result.metrics.eval_loss, rel=1e-5)
    assert found["confusion_matrix"] == result.metrics.confusion_matrix
    assert found["class_names"] == ["bad", "good"]
    status, _, err = _status(["eval", "--run", str(job.root / "run"), "--data", str(job.train),
                              "--output", str(out)])
    assert status == 0 and json.loads(out.read_text())["loss"] != pytest.approx(found["loss"])


def test_the_builtin_jobs_run_merges_into_a_plain_encoder_and_its_head(tmp_path: Path) -> None:
    """``deltadist merge --run`` of the built-in job: MiniLM with the LoRA folded in, as a plain
    ``BertModel`` checkpoint, and the classifier beside it; transformers' ``AutoModel`` + mean pooling +
    that head give the job's predictions."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    result = train(load_config(None, [*BUILTIN, f"output_dir={tmp_path / 'run'}"]))
    status, printed, err = _status(["merge", "--run", str(tmp_path / "run"),
                                    "--out", str(tmp_path / "merged")])
    assert status == 0 and "the encoder of" in printed, err
    encoder = AutoModel.from_pretrained(tmp_path / "merged").eval()
    head = {k: v for k, v in load_file(tmp_path / "merged" / "model.safetensors").items()
            if k.startswith("classifier")}
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = tokenizer(["The referee showed a red card.", "Heavy rain all week."], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        logits = (hidden * mask).sum(1) / mask.sum(1) @ head["classifier.weight"].T + head["classifier.bias"]
        expected = result.model.eval()(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_export_of_a_run_loads_in_peft_the_builtin_one_as_its_encoders_adapter(tmp_path: Path) -> None:
    """``deltadist export --run`` of a BERT classification job (a base checkpoint: the head is new)
    gives PEFT's adapter that ``PeftModel`` loads to the job's logits; of the built-in job, the
    encoder's adapter and the head beside it, which PEFT + mean pooling + the head turn into the job's
    logits."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForSequenceClassification

    job = make_job(tmp_path / "cls", "sequence_classification", epochs=1)
    result = train(load_config(job.config))
    status, _, err = _status(["export", "--run", str(job.root / "run"), "--out", str(tmp_path / "peft")])
    assert status == 0, err
    base = AutoModelForSequenceClassification.from_pretrained(job.model, num_labels=2)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ids = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 9, 3, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids, attention_mask=mask).logits,
                                   result.model.eval()(input_ids=ids, attention_mask=mask).logits)

    # The built-in job's model is no transformers class: the encoder's adapter, the head beside it.
    builtin = train(load_config(None, [*BUILTIN, f"output_dir={tmp_path / 'builtin'}"]))
    status, printed, err = _status(["export", "--run", str(tmp_path / "builtin"),
                                    "--out", str(tmp_path / "x")])
    assert status == 0 and "classifier.bias, classifier.weight in head.safetensors" in printed, err
    path = builtin.model.encoder.name_or_path
    encoder = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(path), tmp_path / "x").eval()
    head = load_file(tmp_path / "x" / "head.safetensors")
    batch = AutoTokenizer.from_pretrained(path)(["Snow fell on the stadium."], return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        logits = (hidden * mask).sum(1) / mask.sum(1) @ head["classifier.weight"].T + head["classifier.bias"]
        expected = builtin.model.eval()(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_a_bf16_runs_predictions_are_those_its_evaluation_scores(tmp_path: Path) -> None:
    """A half-precision backbone with its fp32 delta and head predicts under autocast, as the job
    computes: the predicted labels' accuracy is what ``deltadist eval`` (the job's steps) reports."""
    job = make_job(tmp_path / "cls", "sequence_classification", epochs=1)
    train(load_config(job.config, ["model.dtype=bf16"]))
    status, rows, err = _cli(["predict", "--run", str(job.root / "run"), "--input", str(job.eval)])
    assert status == 0, err
    labels = [json.loads(line)["label"] for line in job.eval.read_text().splitlines()]
    assert len(rows) == len(labels) and {r["prediction"] for r in rows} <= {"bad", "good"}
    status, _, err = _status(["eval", "--run", str(job.root / "run"), "--data", str(job.eval),
                              "--output", str(tmp_path / "eval.json")])
    right = sum(r["prediction"] == label for r, label in zip(rows, labels)) / len(labels)
    assert status == 0 and json.loads((tmp_path / "eval.json").read_text())["accuracy"] == right, err
