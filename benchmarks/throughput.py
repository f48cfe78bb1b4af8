"""Training throughput: deltadist's LoRA and BitFit against full fine-tuning and PEFT's LoRA.

One process, the shipped all-MiniLM-L6-v2 backbone (BERT, 22.7M parameters) with a classifier
head, AdamW, batches of 32 sentences x 64 tokens. Every method gets its own model; the methods run
interleaved, one timed step each per round, so all of them see the same machine state; the first
rounds are warm-up. Prints a table (median step time, sentences per second, ratio to full
fine-tuning) and writes ``benchmarks/results/throughput.json``.

    python benchmarks/throughput.py [--rounds 20] [--warmup 3] [--device cpu|cuda]

PEFT is optional (``pip install peft torch==<your torch>``); without it its row says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from typing import Callable

import torch
from torch import nn

from report import missing_peer, report
from stepping import BATCH_ROWS, Build, minilm_classifier, time_methods

LORA_TARGETS = ["query", "value"]


def full_finetuning() -> tuple[nn.Module, list[nn.Parameter]]:
    model = minilm_classifier()
    return model, list(model.parameters())


def deltadist_method(delta_type: str) -> Callable[[], tuple[nn.Module, list[nn.Parameter]]]:
    def build() -> tuple[nn.Module, list[nn.Parameter]]:
        from deltadist import AutoDeltaConfig, AutoDeltaModel

        model = minilm_classifier()
        config = {"delta_type": delta_type, "unfrozen_modules": ["deltas", "classifier"]}
        if delta_type == "lora":
            config |= {"modified_modules": LORA_TARGETS, "lora_r": 8}
        delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(config), backbone_model=model)
        delta.freeze_module(set_state_dict=False)
        return model, list(delta.parameters())

    return build


def peft_lora() -> tuple[nn.Module, list[nn.Parameter]]:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(minilm_classifier(), LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS,
                                                  modules_to_save=["classifier"]))
    return model, [p for p in model.parameters() if p.requires_grad]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    methods: dict[str, Build] = {
        "full fine-tuning": full_finetuning,
        "deltadist LoRA r=8": deltadist_method("lora"),
        "deltadist BitFit": deltadist_method("bitfit"),
    }
    if importlib.util.find_spec("peft"):
        methods["PEFT LoRA r=8"] = peft_lora
    times, trainable = time_methods(methods, args.rounds, args.warmup, device)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base, batch_size = medians["full fine-tuning"], BATCH_ROWS
    columns = ["method", "trainable params", "median step ms", "sentences/s", "speed vs full FT"]
    rows = [[name, f"{trainable[name]:,}", f"{median * 1e3:.1f}", f"{batch_size / median:.1f}",
             f"{base / median:.2f}x"] for name, median in medians.items()]
    if "PEFT LoRA r=8" not in methods:
        rows.append(missing_peer("PEFT LoRA r=8", "peft", columns))
    report("throughput", f"Training step, MiniLM-L6 classifier, batch {batch_size}x64, {args.device}, "
                         f"{args.rounds} interleaved rounds", columns, rows,
           {"device": args.device, "rounds": args.rounds, "seconds": times, "median": medians,
            "trainable": trainable, "torch": torch.__version__},
           {name: base / median for name, median in medians.items()}, "speed vs full fine-tuning")


if __name__ == "__main__":
    main()
