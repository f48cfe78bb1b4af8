"""A causal_lm job for ``training.eval_generation`` whose score is not trivially 0: every other
evaluation row's completion is what the random-weight checkpoint itself generates greedily from
the row's prompt, so a delta that barely moves the model (a small ``lr``) matches about half."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltadist import AutoDeltaModel
from tests.task_jobs import Job, make_job
from tests.text_tasks import write_jsonl

NEW_TOKENS = 4


def prompt_ids(row: dict[str, Any], tokenizer: Any) -> list[int]:
    """The ids a row's completion follows: its prompt as encoded alone, or (chat rows) the turns
    before the last with the chat template's generation prompt."""
    if "prompt" in row:
        return tokenizer(row["prompt"])["input_ids"]
    turns = row.get("messages") or [{"role": {"gpt": "assistant", "human": "user"}.get(t["from"], t["from"]),
                                     "content": t["value"]} for t in row["conversations"]]
    text = tokenizer.apply_chat_template(turns[:-1], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion(row: dict[str, Any]) -> str:
    if "completion" in row:
        return row["completion"]
    turns = row.get("messages") or row["conversations"]
    return turns[-1].get("content", turns[-1].get("value"))


def with_completion(row: dict[str, Any], text: str) -> dict[str, Any]:
    if "completion" in row:
        return {**row, "completion": text}
    key = "messages" if "messages" in row else "conversations"
    last = {**row[key][-1], ("content" if key == "messages" else "value"): text}
    return {**row, key: [*row[key][:-1], last]}


@torch.no_grad()
def greedy_texts(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> list[str]:
    """Each row's greedy continuation (one row at a time, no padding), up to eos or the chat
    end-of-turn marker, special tokens dropped, stripped."""
    stops = [tokenizer.eos_token_id] + tokenizer.convert_tokens_to_ids(
        [t for t in ("<|im_end|>",) if t in tokenizer.get_vocab()])
    texts = []
    for row in rows:
        ids = torch.tensor([prompt_ids(row, tokenizer)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
        texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return texts


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def generation_job(root: Path, chat: bool = False, eval_rows: int = 16, **training: Any) -> Job:
    """:func:`~tests.task_jobs.make_job` (causal_lm, llama) with half its evaluation rows' completions
    replaced by the checkpoint's own greedy continuation."""
    job = make_job(root, "causal_lm", eval_rows=eval_rows, chat=chat,
                   **{"eval_generation": "exact_match", "eval_max_new_tokens": NEW_TOKENS, **training})
    model = AutoModelForCausalLM.from_pretrained(job.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    rows = read_rows(job.eval)
    greedy = greedy_texts(model, tokenizer, rows)
    write_jsonl(job.eval, [with_completion(row, text) if index % 2 == 0 and text else row
                           for index, (row, text) in enumerate(zip(rows, greedy))])
    return job


def recomputed_exact_match(job: Job, delta_dir: Path) -> float:
    """The fraction of evaluation rows whose greedy continuation by the checkpoint with the delta
    at ``delta_dir`` equals the row's completion (whitespace stripped)."""
    model = AutoModelForCausalLM.from_pretrained(job.model).eval()
    AutoDeltaModel.from_finetuned(delta_dir, backbone_model=model)
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    rows = read_rows(job.eval)
    texts = greedy_texts(model, tokenizer, rows)
    return sum(text == completion(row).strip() for text, row in zip(texts, rows)) / len(rows)
