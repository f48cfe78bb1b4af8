"""Tiny checkpoints and data sets for ``deltadist train`` on the user's own model and rows.

:func:`make_job` writes, under a directory, a random-weight transformers checkpoint of one family
saved with ``save_pretrained`` (with a word-level tokenizer trained on the rows), training and
evaluation rows as JSON Lines, and a config for the task. The rows are learnable patterns over a
small vocabulary: a completion reverses its prompt's words; a label is the keyword among a
row's words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from tests.text_tasks import bert_style_tokenizer, chat_tokenizer, word_tokenizer, write_jsonl

WORDS = [f"w{i}" for i in range(16)]
ARROW = "->"


def lm_rows(count: int, seed: int) -> list[dict[str, str]]:
    """``{"prompt": "w3 w1 w7 ->", "completion": "w7 w1 w3"}`` rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = rng.sample(WORDS, 3)
        rows.append({"prompt": " ".join(words) + f" {ARROW}", "completion": " ".join(reversed(words))})
    return rows


def chat_rows(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """:func:`lm_rows` as chat rows: ``{"messages": [user prompt, assistant completion]}``, every
    third with a system turn first and every fourth in ShareGPT's spelling (``conversations``)."""
    chats: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        turns = [("user", row["prompt"]), ("assistant", row["completion"])]
        if index % 3 == 0:
            turns.insert(0, ("system", "reverse"))
        if index % 4 == 0:
            sharegpt = {"system": "system", "user": "human", "assistant": "gpt"}
            chats.append({"conversations": [{"from": sharegpt[r], "value": c} for r, c in turns]})
        else:
            chats.append({"messages": [{"role": r, "content": c} for r, c in turns]})
    return chats


def label_rows(count: int, seed: int) -> list[dict[str, str]]:
    """``{"text": "w3 good w9 w1", "label": "good"}``: the label is the keyword among the words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words, label = rng.sample(WORDS, 3), rng.choice(["good", "bad"])
        words.insert(rng.randrange(4), label)
        rows.append({"text": " ".join(words), "label": label})
    return rows


_SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {**_SMALL, "num_key_value_heads": 2, "max_position_embeddings": 64, "attention_dropout": 0.0,
              "tie_word_embeddings": False},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "resid_pdrop": 0.0,
             "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "t5": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
           "dropout_rate": 0.0},
    "bert": {**_SMALL, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
             "attention_probs_dropout_prob": 0.0},
}


def save_checkpoint(directory: Path, family: str, tokenizer: Any, head: str = "lm", seed: int = 0,
                    overrides: dict[str, Any] | None = None) -> Path:
    """A random ``family`` model with ``head`` (``lm``: its language-model head; ``base``: none)
    and ``tokenizer``, written with ``save_pretrained``; ``overrides`` change its config."""
    special = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if tokenizer.bos_token_id is not None:
        special.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "t5":
        special["decoder_start_token_id"] = tokenizer.pad_token_id
    config = AutoConfig.for_model(family, **{**FAMILIES[family], **(overrides or {})}, **special)
    torch.manual_seed(seed)
    if head == "base":
        model = AutoModel.from_config(config)
    elif family == "t5":
        model = AutoModelForSeq2SeqLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@dataclass
class Job:
    """Paths of one test job."""

    root: Path
    model: Path
    train: Path
    eval: Path
    config: Path

    def config_dict(self) -> dict[str, Any]:
        return yaml.safe_load(self.config.read_text())


TASK_FAMILY = {"causal_lm": "llama", "seq2seq": "t5", "sequence_classification": "bert"}
DELTAS = {
    "llama": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "t5": ["q", "v", "o", "wi", "wo"],
    "bert": ["query", "value", "dense"],
}


def make_job(root: Path, task: str, family: str | None = None, head: str = "lm", train_rows: int = 64,
             eval_rows: int = 32, model_config: dict[str, Any] | None = None, chat: bool = False,
             **training: Any) -> Job:
    """Checkpoint, rows and config of a small job of ``task`` under ``root``.

    ``model_config`` overrides keys of the checkpoint's config, ``training`` keys of the config's
    ``training`` section. ``chat`` (causal_lm): the rows as :func:`chat_rows`, the tokenizer a
    :func:`~tests.text_tasks.chat_tokenizer` with the ChatML template.
    """
    family = family or TASK_FAMILY[task]
    make_rows = label_rows if task == "sequence_classification" else lm_rows
    train, evaluation = make_rows(train_rows, seed=1), make_rows(eval_rows, seed=2)
    corpus = [" ".join(str(v) for v in row.values()) for row in train + evaluation]
    if chat:
        tokenizer = chat_tokenizer(["reverse", *corpus])
        train, evaluation = chat_rows(train), chat_rows(evaluation)
    elif family == "bert":
        tokenizer = bert_style_tokenizer(corpus)
    else:
        tokenizer = word_tokenizer(corpus, template="$A [EOS]" if family == "t5" else "[BOS] $A")
    root.mkdir(parents=True, exist_ok=True)
    model = save_checkpoint(root / "model", family, tokenizer, head=head if task != "sequence_classification"
                            else "base", overrides=model_config)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "eval.jsonl", evaluation)
    config = {
        "task": task,
        "model": {"name_or_path": str(model), "max_length": 32, "dtype": "fp32"},
        "delta": {"delta_type": "lora", "modified_modules": DELTAS[family], "lora_r": 4, "lora_alpha": 8},
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl")},
        "training": {"epochs": 3, "batch_size": 8, "eval_batch_size": 16, "lr": 0.01, "seed": 0,
                     **training},
        "output_dir": str(root / "run"),
    }
    (root / "job.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return Job(root, model, root / "train.jsonl", root / "eval.jsonl", root / "job.yaml")
