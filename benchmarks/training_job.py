"""``deltadist train`` against a hand-written loop and HF ``Trainer`` + PEFT on the same job.

The job is the built-in one (LoRA r=8 on ``query``/``value`` plus the classifier of the shipped
all-MiniLM-L6-v2, 1,000 sentences, batch 32, AdamW, fp32). Each contender runs the whole job in its
own process, contenders alternating over the rounds, and reports the tokens per second of its
training loop (model loading and evaluation left out):

* ``deltadist train``: the job, as the CLI runs it (metrics.json's ``tokens_per_second``);
* a hand-written loop: the same model, delta, batches (the job's own data pipeline) and loss,
  stepped by 15 lines of plain PyTorch -- the job's own overhead is the difference;
* ``Trainer`` + PEFT: transformers' Trainer on the same examples and collator, LoRA by PEFT.

Target: the job within 3% of the hand-written loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.suite import ROOT, Check, Ratio, Result

TARGET_TO_LOOP = 1.03
KINDS = {"job": "deltadist train", "loop": "hand-written loop", "trainer": "Trainer + PEFT"}


def _job_parts(output_dir: str) -> tuple[Any, Any, Any, Any]:
    """The built-in job's config, model, tokenized data and step plan, as the job builds them."""
    import torch

    from deltadist.training.batching import plan_steps
    from deltadist.training.config import DEFAULT_CONFIG_PATH, load_config
    from deltadist.training.job_data import load_rows, tokenize
    from deltadist.training.model import load_model

    cfg = load_config(DEFAULT_CONFIG_PATH, overrides=[f"output_dir={output_dir}"])
    t = cfg.training
    rows = load_rows(cfg)
    loaded = load_model(cfg.model, cfg.task, rows.labels, t.seed, torch.float32, False)
    data = tokenize(rows, cfg, loaded.tokenizer)
    plan = plan_steps(t.batch_size, t.micro_batch_size, t.gradient_accumulation_steps, 1, len(data.train),
                      t.epochs, t.max_steps)
    return cfg, loaded, data, plan


def _warm_up(model: Any, collate: Any, data: Any, task: str) -> None:
    """One forward without gradients, as the job's evaluation before training gives it: the first
    timed step is then not the process's first forward."""
    import torch

    from deltadist.training.objectives import summed_loss

    with torch.no_grad():
        summed_loss(task, model, collate(list(data.train[:32])))


def run_job(output_dir: str) -> float:
    from deltadist.training.config import DEFAULT_CONFIG_PATH, load_config
    from deltadist.training.loop import train

    cfg = load_config(DEFAULT_CONFIG_PATH, overrides=[f"output_dir={output_dir}"])
    return train(cfg).metrics.tokens_per_second


def run_loop(output_dir: str) -> float:
    """The job's steps written by hand: same model, delta, batches and loss; no engine, no logging."""
    import torch

    from deltadist import AutoDeltaConfig, AutoDeltaModel
    from deltadist.training.batching import Collator, batches_after, micro_batches
    from deltadist.training.objectives import summed_loss

    cfg, loaded, data, plan = _job_parts(output_dir)
    t, model = cfg.training, loaded.model
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(dict(cfg.delta)), backbone_model=model)
    delta.freeze_module()
    optimizer = torch.optim.AdamW(delta.parameters(), lr=t.lr)
    collate = Collator(cfg.task, loaded.tokenizer.pad_token_id, None)
    lengths = [len(e.input_ids) for e in data.train]
    _warm_up(model, collate, data, cfg.task)
    model.train()
    tokens, start = 0, time.perf_counter()
    for batch in batches_after(data.train, lengths, plan, t.seed, cfg.data.sort_by_length, 0):
        (micro,) = micro_batches(batch, cfg.task, collate, 0, 1, 1)
        loss_sum, _ = summed_loss(cfg.task, model, micro.inputs)
        (loss_sum * micro.loss_scale).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += micro.tokens
    return tokens / (time.perf_counter() - start)


def run_trainer(output_dir: str) -> float:
    """transformers' Trainer with PEFT's LoRA on the same examples, collator and loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from deltadist.training.batching import Collator
    from deltadist.training.objectives import summed_loss

    cfg, loaded, data, _ = _job_parts(output_dir)
    t = cfg.training
    model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                    modules_to_save=["classifier"]))
    collate = Collator(cfg.task, loaded.tokenizer.pad_token_id, None)

    class JobTrainer(Trainer):
        def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False, **kwargs: Any) -> Any:
            loss_sum, _ = summed_loss(cfg.task, model, inputs)
            return loss_sum / inputs["labels"].shape[0]

    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=t.batch_size,
                             learning_rate=t.lr,
                             num_train_epochs=t.epochs, lr_scheduler_type="constant", save_strategy="no",
                             logging_strategy="no", report_to=[], use_cpu=True, seed=t.seed,
                             remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0)
    trainer = JobTrainer(model=model, args=args, train_dataset=list(data.train), data_collator=collate)
    _warm_up(model, collate, data, cfg.task)
    torch.manual_seed(t.seed)
    seconds = trainer.train().metrics["train_runtime"]
    return sum(len(e.input_ids) for e in data.train) * t.epochs / seconds


def run(quick: bool) -> Result:
    rounds = 2 if quick else 5
    tokens_per_s: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(rounds):
        for kind in KINDS:  # alternating whole jobs, each in a fresh process
            with tempfile.TemporaryDirectory() as output_dir:
                done = subprocess.run([sys.executable, "-m", "benchmarks.training_job", kind, output_dir],
                                      cwd=ROOT, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{KINDS[kind]} failed:\n{done.stderr[-2000:]}")
            tokens_per_s[kind].append(json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"])
    loop = tokens_per_s["loop"]
    # Ratios of time (the inverse of throughput), so that above 1 means slower, as elsewhere.
    ratios = {kind: Ratio.of(loop, values) for kind, values in tokens_per_s.items()}
    rows = [[KINDS[kind], f"{Ratio.spread(tokens_per_s[kind]).value:,.0f}", str(ratios[kind])]
            for kind in KINDS]
    return Result(
        name="training_job",
        title=f"The built-in job (MiniLM-L6 + LoRA, 1,000 sentences, batch 32, CPU): "
              f"{rounds} alternating runs",
        columns=["contender", "training tokens/s", "time / hand-written loop"], rows=rows,
        data={"tokens_per_s": tokens_per_s}, bars={"built-in job": ratios},
        bar_label="training time / hand-written loop",
        checks=[Check("deltadist train / hand-written loop", ratios["job"].value, TARGET_TO_LOOP,
                      ratios["job"].noise)],
        notes=["Training loop only (loading and evaluation left out); each job in a fresh process."])


def main() -> None:
    kind, output_dir = sys.argv[1], sys.argv[2]
    runner = {"job": run_job, "loop": run_loop, "trainer": run_trainer}[kind]
    print(json.dumps({"tokens_per_s": runner(output_dir)}))


if __name__ == "__main__":
    main()
