"""A forward over one batch whose rows use k different LoRA deltas: deltadist vs PEFT (CPU).

A small Llama (hidden 512, 4 layers) carries 16 LoRA deltas (r=16 on all seven projections, so
the deltas' share of the work is visible). Timed, interleaved over the rounds, each row a forward
of 32 rows x 32 tokens under ``torch.no_grad``:

* deltadist, one delta for the whole batch (a copy of the model with that one delta): the baseline;
* deltadist ``mixed_batch`` with k = 1, 4 and 16 distinct deltas (rows dealt round-robin; all 16
  attached, the unlisted ones serve no row);
* PEFT, one adapter active; PEFT ``adapter_names`` with k = 1, 4 and 16 (the same 16 adapters).

Target (issue 12): deltadist at k = 16 at most 1.3x its one-delta batch, and faster than PEFT at
every k.

    python benchmarks/mixed_batch.py [--rounds 15] [--threads 2]

PEFT is optional (``pip install peft``); without it its rows say so.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
from typing import Callable

import torch
from report import missing_peer, report
from torch import nn

DELTAS, BATCH, SEQ, RANK = 16, 32, 32, 16
KS = (1, 4, 16)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_RATIO_AT_16 = 1.3


def backbone() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=1000)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def lora(model: nn.Module) -> object:
    from deltadist import LoraModel

    delta = LoraModel(backbone_model=model, lora_r=RANK, modified_modules=TARGETS)
    with torch.no_grad():
        for param in delta.parameters():
            param.normal_(0, 0.02)
    return delta


def deltadist_rows(base: nn.Module, inputs: dict) -> dict[str, Callable[[], object]]:
    import deltadist

    single = copy.deepcopy(base)  # the baseline: a model with one delta, no block
    lora(single)
    model = copy.deepcopy(base)
    deltas = [lora(model) for _ in range(DELTAS)]

    def mixed(k: int) -> Callable[[], object]:
        rows = [deltas[i % k] for i in range(BATCH)]

        def run() -> object:
            with deltadist.mixed_batch(rows):
                return model(**inputs)

        return run

    return {"deltadist, one delta": lambda: single(**inputs),
            **{f"deltadist mixed, k={k}": mixed(k) for k in KS}}


def peft_rows(model: nn.Module, inputs: dict) -> dict[str, Callable[[], object]]:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, config, adapter_name="a0")
    for i in range(1, DELTAS):
        peft_model.add_adapter(f"a{i}", config)
    peft_model.set_adapter("a0")
    peft_model.eval()

    def named(k: int) -> Callable[[], object]:
        names = [f"a{i % k}" for i in range(BATCH)]
        return lambda: peft_model(**inputs, adapter_names=names)

    return {"PEFT, one adapter": lambda: peft_model(**inputs),
            **{f"PEFT adapter_names, k={k}": named(k) for k in KS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inputs = {"input_ids": torch.randint(3, 1000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))}
    base = backbone()
    rows = deltadist_rows(base, inputs)
    if importlib.util.find_spec("peft"):
        rows.update(peft_rows(copy.deepcopy(base), inputs))
    times: dict[str, list[float]] = {name: [] for name in rows}
    with torch.no_grad():
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, run in rows.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    baseline = medians["deltadist, one delta"]
    table = []
    for name in rows:
        k = name.rsplit("k=", 1)[1] if "k=" in name else None
        peft = medians.get(f"PEFT adapter_names, k={k}") if k and name.startswith("deltadist") else None
        table.append([name, f"{medians[name] * 1000:.1f}", f"{medians[name] / baseline:.2f}x",
                      f"{peft / medians[name]:.2f}x" if peft else "-"])
    columns = ["row", "median ms", "vs deltadist one delta", "deltadist speed vs PEFT, same k"]
    if not importlib.util.find_spec("peft"):
        table.append(missing_peer("PEFT adapter_names", "peft", columns))
    report(
        "mixed_batch", f"Forward of {BATCH} rows x {SEQ} tokens, rows over k LoRA deltas (CPU)",
        columns, table,
        {"rounds": args.rounds, "threads": args.threads, "median_s": medians,
         "ratio_to_one_delta": {n: medians[n] / baseline for n in rows},
         "target_ratio_at_16": TARGET_RATIO_AT_16, "torch": torch.__version__},
        {n: medians[n] * 1000 for n in rows}, "median ms (lower is better)",
    )


if __name__ == "__main__":
    main()
