"""A trained delta's predictions on rows (``deltadist predict``): class names for
``sequence_classification``, generated text for ``causal_lm`` and ``seq2seq``.

The model is built as the job built it (:func:`~deltadist.training.model.load_model`: the same
class, head and dtype) and the saved delta attached with ``from_finetuned``, so a run's delta
predicts on the model it was trained on. Inputs are read and encoded as the job read them:
``text`` rows for classification; ``prompt`` rows (or ``text``, continued), encoded as the job
encoded prompts, and chat rows (``messages`` / ``conversations``), rendered with the chat template
and its generation prompt (a trailing assistant turn is the reference: it is left out).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from tqdm import tqdm

from deltadist.api.auto import AutoDeltaModel
from deltadist.errors import ConfigError
from deltadist.training.chat_data import chat_fields, chat_rows, read_template
from deltadist.training.config import ModelConfig
from deltadist.training.generation_eval import completion_text, generate_batch
from deltadist.training.model import load_model, resolve_dtype
from deltadist.training.steps import autocast_for


@dataclass
class Predictor:
    """A backbone with its delta attached, ready to predict (see :func:`load_predictor`)."""

    model: nn.Module
    tokenizer: Any
    task: str
    labels: list[str] | None
    """sequence_classification: the class names, index ``i`` naming class ``i``."""
    max_length: int
    chat_template: str | None
    dtype: torch.dtype = torch.float32
    """The backbone's: a half-precision one runs under autocast, as in the job (fp32 deltas and heads)."""

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """As the job's steps compute: :func:`~deltadist.training.steps.autocast_for`."""
        return autocast_for(self.dtype, next(self.model.parameters()).device.type)


def load_predictor(model: ModelConfig, task: str, labels: list[str] | None, delta_dir: str | os.PathLike,
                   chat_template: str | None = None) -> Predictor:
    """``model``'s backbone for ``task``, built as the job builds it, with the delta saved in
    ``delta_dir`` attached (its fingerprint checked against the backbone)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(model.dtype, device)
    loaded = load_model(model, task, labels, 0, dtype, show_progress=False)
    AutoDeltaModel.from_finetuned(delta_dir, backbone_model=loaded.model)
    return Predictor(loaded.model.to(device).eval(), loaded.tokenizer, task, labels, model.max_length,
                     read_template(chat_template), dtype)


def predict(predictor: Predictor, dataset: Any, path: str | os.PathLike, batch_size: int,
            max_new_tokens: int = 64, sampling: Mapping[str, Any] | None = None,
            progress: bool = True) -> Iterator[dict[str, Any]]:
    """Each row of ``dataset`` (a ``datasets.Dataset``) with its ``prediction`` added (and, for
    classification, its ``score``: the predicted class's probability), in row order, a batch at a time.

    Raises:
        ConfigError: rows without the fields the task reads (naming the file and the fix).
    """
    rows = dataset.to_list()
    if predictor.task == "sequence_classification":
        inputs: list[Any] = _column(dataset, "text", path, "sequence_classification rows need a text field")
    else:
        inputs = _prompts(predictor, dataset, path)
    batches = range(0, len(rows), batch_size)
    for start in tqdm(batches, desc="predict", unit="batch", disable=not progress):
        chunk = inputs[start:start + batch_size]
        with torch.no_grad(), predictor.autocast():
            if predictor.task == "sequence_classification":
                answers = _classify(predictor, chunk)
            else:
                answers = _generate(predictor, chunk, max_new_tokens, sampling)
        for row, answer in zip(rows[start:start + batch_size], answers):
            yield {**row, **answer}


def _classify(predictor: Predictor, texts: list[str]) -> list[dict[str, Any]]:
    encoded = predictor.tokenizer(texts, truncation=True, max_length=predictor.max_length, padding=True,
                                  return_tensors="pt")
    device = next(predictor.model.parameters()).device
    out = predictor.model(input_ids=encoded["input_ids"].to(device),
                          attention_mask=encoded["attention_mask"].to(device))
    probabilities = (out if isinstance(out, torch.Tensor) else out.logits).float().softmax(-1)
    score, index = probabilities.max(-1)
    return [{"prediction": predictor.labels[i], "score": round(float(s), 6)}
            for i, s in zip(index.tolist(), score.tolist())]


def _prompts(predictor: Predictor, dataset: Any, path: str | os.PathLike) -> list[Any]:
    """Token ids to generate from (causal_lm), or source texts (seq2seq)."""
    tokenizer, fields = predictor.tokenizer, chat_fields(dataset, None, path, "--input")
    if fields:
        if predictor.task == "seq2seq":
            raise ConfigError(f"--input {os.fspath(path)}: chat rows are for causal_lm; give seq2seq "
                              "prompt rows.")
        template = predictor.chat_template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise ConfigError(f"--input {os.fspath(path)} holds chat rows, but the tokenizer has no chat "
                              "template; set the run's data.chat_template.")
        prompts = []
        for turns in chat_rows(dataset, fields, path, "--input", answered=False):
            if turns[-1]["role"] == "assistant":  # the reference answer: generate it
                turns = turns[:-1]
            text = tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
            prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        return prompts
    field = "prompt" if "prompt" in dataset.column_names else "text"
    texts = _column(dataset, field, path, "rows need a prompt (or text) field, or chat turns")
    if predictor.task == "seq2seq":
        return texts
    return tokenizer(texts, return_attention_mask=False, verbose=False)["input_ids"]  # as the job encodes


def _generate(predictor: Predictor, prompts: list[Any], max_new_tokens: int,
              sampling: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    tokenizer, model = predictor.tokenizer, predictor.model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # A generated special token ends the answer: eos, and a chat template's end of turn.
    stops = sorted(set(tokenizer.all_special_ids) - {pad} | ({tokenizer.eos_token_id} - {None}))
    if predictor.task == "causal_lm":
        continuations = generate_batch(model, prompts, pad, max_new_tokens, stops, False, sampling)
    else:
        encoded = tokenizer(prompts, truncation=True, max_length=predictor.max_length, padding=True,
                            return_tensors="pt").to(next(model.parameters()).device)
        continuations = model.generate(**encoded, max_new_tokens=max_new_tokens, num_beams=1,
                                       **dict(sampling or {"do_sample": False})).tolist()
    return [{"prediction": completion_text(ids, tokenizer, stops)} for ids in continuations]


def _column(dataset: Any, name: str, path: str | os.PathLike, need: str) -> list[Any]:
    values = dataset[name][:] if name in dataset.column_names else None
    if values is None or any(not isinstance(v, str) for v in values):
        row = 1 if values is None else next(i for i, v in enumerate(values, 1) if not isinstance(v, str))
        raise ConfigError(f"--input {os.fspath(path)} row {row}: no '{name}' text (columns: "
                          f"{', '.join(dataset.column_names)}); {need}.")
    return values


def run_labels(task: str, config: Any) -> list[str] | None:
    """The class names a checkpoint's config gives (``id2label``), for ``--model`` without a run."""
    if task != "sequence_classification":
        return None
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[i]) for i in sorted(id2label)]


def task_of(config: Any) -> str:
    """The task of a checkpoint, from its config's ``architectures`` (``...ForCausalLM`` and so on)."""
    names = " ".join(getattr(config, "architectures", None) or [])
    if "ForSequenceClassification" in names:
        return "sequence_classification"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if "ForCausalLM" in names or "LMHeadModel" in names:
        return "causal_lm"
    raise ConfigError(f"the checkpoint's architectures ({names or 'none'}) name no task deltadist predicts; "
                      "pass --run DIR of the job instead.")


def run_files(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``(config.yaml, delta/)`` of a ``deltadist train`` run directory."""
    from deltadist.training.config_files import RUN_CONFIG_NAME

    run = Path(run_dir)
    config, delta = run / RUN_CONFIG_NAME, run / "delta"
    if not config.is_file() or not delta.is_dir():
        raise ConfigError(f"--run {os.fspath(run_dir)} is not a finished deltadist train run: it needs "
                          f"{RUN_CONFIG_NAME} and delta/ (the job writes both); pass --model and --delta "
                          "for a delta trained elsewhere.")
    return config, delta
