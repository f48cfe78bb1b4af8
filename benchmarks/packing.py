"""``data.packing``: the training tokens per second of ``deltadist train`` (task causal_lm) with
whole examples packed into rows, against the same job with padded batches.

The built-in data's sentences (``builtin:topics``, 1,000 train sentences) are written as causal_lm
``{"text"}`` rows. The shipped MiniLM is an encoder, so the model is a small Llama-style causal LM
built on disk with random weights (hidden 128, 4 layers, MiniLM's tokenizer; no download). The job:
LoRA r=8 on the attention projections, batch 32 rows, ``model.max_length`` 64 (the packed row
size), fp32, the CPU. Each job runs in its own process, packed and padded alternating over the
rounds; the number is metrics.json's ``tokens_per_second`` (training loop only: real tokens,
padding not counted). No target: the gain depends on how much padding the data has.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.suite import ROOT, Ratio, Result

KINDS = {"padded": "padded batches", "packed": "data.packing: true"}
MODEL = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 128, "tie_word_embeddings": False}


def make_job(directory: Path, epochs: int) -> Path:
    """A causal LM checkpoint, the built-in sentences as text rows and the job's config, under
    ``directory``; returns the config's path."""
    import torch
    import yaml
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from deltadist.training.data import load_topics
    from deltadist.training.model import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:minilm"))
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **MODEL)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    train, _ = load_topics(1000, 10, 0)
    (directory / "train.jsonl").write_text("".join(json.dumps({"text": e.text}) + "\n" for e in train))
    job = {"task": "causal_lm", "model": {"name_or_path": str(directory / "model"), "max_length": 64,
                                         "dtype": "fp32"},
           "delta": {"delta_type": "lora", "modified_modules": ["q_proj", "v_proj"], "lora_r": 8},
           "data": {"train": str(directory / "train.jsonl")},
           "training": {"epochs": epochs, "batch_size": 32, "lr": 1e-3, "log_every": 1000}}
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def run(quick: bool) -> Result:
    rounds, epochs = (2, 1) if quick else (5, 3)
    tokens_per_s: dict[str, list[float]] = {kind: [] for kind in KINDS}
    steps: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as root:
        config = make_job(Path(root), epochs)
        for _ in range(rounds):
            for kind in KINDS:  # alternating whole jobs, each in a fresh process
                done = subprocess.run([sys.executable, "-m", "benchmarks.packing", kind, str(config),
                                       str(Path(root) / kind)], cwd=ROOT, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"{KINDS[kind]} failed:\n{done.stderr[-2000:]}")
                measured = json.loads(done.stdout.strip().splitlines()[-1])
                tokens_per_s[kind].append(measured["tokens_per_s"])
                steps[kind] = measured["steps"]
    gain = Ratio.of(tokens_per_s["packed"], tokens_per_s["padded"])
    rows = [[KINDS[kind], f"{steps[kind]:,}", f"{Ratio.spread(tokens_per_s[kind]).value:,.0f}",
             str(gain) if kind == "packed" else "1.00x"] for kind in KINDS]
    return Result(
        name="packing",
        title=f"Packing: causal LM job on the built-in sentences (Llama-style 4 layers, LoRA, batch 32, "
              f"rows of 64, CPU), {rounds} alternating runs",
        columns=["batches", "optimizer steps", "training tokens/s", "tokens/s vs padded"], rows=rows,
        data={"tokens_per_s": tokens_per_s, "steps": steps, "epochs": epochs},
        bars={"built-in sentences": {"packed / padded": gain}},
        bar_label="training tokens/s, packed / padded",
        notes=["Training loop only (loading, the isolation probe and evaluation left out); real tokens, "
               "padding not counted; each job in a fresh process."])


def main() -> None:
    kind, config, output_dir = sys.argv[1:4]
    from deltadist.training.config import load_config
    from deltadist.training.loop import train

    overrides = [f"output_dir={output_dir}", f"data.packing={kind == 'packed'}"]
    metrics = train(load_config(config, overrides)).metrics
    print(json.dumps({"tokens_per_s": metrics.tokens_per_second, "steps": metrics.steps}))

if __name__ == "__main__":
    main()
