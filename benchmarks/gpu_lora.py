"""LoRA fine-tuning of a ~1.1B Llama on one GPU: deltadist, PEFT and full fine-tuning.

    python -m benchmarks.gpu_lora [--rounds 20] [--batch 8] [--tokens 1024] [--dtype bf16]

A TinyLlama-shaped model (hidden 2048, 22 layers, grouped-query attention, vocab 32000: 1.1B
parameters) with random weights, one copy per contender; LoRA r=16 on all seven projections for
deltadist and PEFT; AdamW. Steps are interleaved over the rounds; reported per contender: median
step time, tokens per second, the ratio to deltadist, and the memory a step adds on top of what is
resident (``torch.cuda.max_memory_allocated`` around one step) next to the resident memory.
Prints the machine (GPU, CUDA, torch) and writes ``benchmarks/results/gpu_lora.json``.

Written for the day a GPU is lent; it has not run yet (no GPU on the machine it was written on).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from typing import Callable

import torch
from torch import nn

from benchmarks.stepping import interleave, training_step
from benchmarks.suite import RESULTS, Ratio, machine

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tinyllama(dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    return model


def contenders(base: nn.Module) -> dict[str, tuple[nn.Module, list[nn.Parameter]]]:
    from peft import LoraConfig, get_peft_model

    from deltadist import LoraModel

    runs = {}
    model = copy.deepcopy(base)
    delta = LoraModel(model, lora_r=16, lora_alpha=32, modified_modules=PROJECTIONS,
                      unfrozen_modules=["deltas"])
    delta.freeze_module(set_state_dict=False)
    runs["deltadist LoRA r=16"] = (model, list(delta.parameters()))
    config = LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    runs["PEFT LoRA r=16"] = (peft_model, [p for p in peft_model.parameters() if p.requires_grad])
    full = copy.deepcopy(base)
    full.requires_grad_(True)
    runs["full fine-tuning"] = (full, list(full.parameters()))
    return runs


def step_memory(step: Callable[[], float], device: torch.device) -> tuple[float, float]:
    """``(GiB resident before the step, GiB the step adds at its peak)``."""
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return resident / 2**30, (torch.cuda.max_memory_allocated(device) - resident) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_lora needs a CUDA GPU; none is visible (torch.cuda.is_available() "
                         "is False). The CPU suite is `python -m benchmarks run`.")
    device = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(json.dumps({**machine(), "gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda},
                     indent=2))
    base = tinyllama(dtype, device)
    ids = torch.randint(0, 32000, (args.batch, args.tokens), device=device)
    steps = {}
    for name, (model, params) in contenders(base).items():
        model.train()
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        steps[name] = training_step(model, optimizer, lambda m: m(input_ids=ids, labels=ids).loss, device)
    del base
    memory = {name: step_memory(step, device) for name, step in steps.items()}
    times = interleave(steps, args.rounds, args.warmup)
    mine = times["deltadist LoRA r=16"]
    tokens = args.batch * args.tokens
    rows = {}
    for name, values in times.items():
        median = statistics.median(values)
        rows[name] = {"median_ms": median * 1e3, "tokens_per_s": tokens / median,
                      "time_vs_deltadist": Ratio.of(values, mine).value,
                      "resident_gib": memory[name][0], "step_adds_gib": memory[name][1]}
        print(f"{name:22s} {median * 1e3:8.1f} ms  {tokens / median:10,.0f} tok/s  "
              f"{rows[name]['time_vs_deltadist']:.2f}x deltadist  resident {memory[name][0]:.1f} GiB, "
              f"a step adds {memory[name][1]:.1f} GiB")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_lora.json").write_text(json.dumps(
        {"machine": {**machine(), "gpu": torch.cuda.get_device_name(device)}, "args": vars(args),
         "rows": rows,
         "seconds": times}, indent=2) + "\n")


if __name__ == "__main__":
    main()
