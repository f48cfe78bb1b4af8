"""LoRA training step: deltadist's LoRA against a hand-written LoRA (the floor), interleaved.

One process, the shipped all-MiniLM-L6-v2 backbone (BERT, 22.7M parameters) with a classifier
head, LoRA r=8 on ``query`` and ``value``, the head trained too, AdamW, batches of 32 x 64 tokens.
The floor replaces each target ``nn.Linear`` by a module that computes ``W x + s B A x`` itself: no
hooks, no library. Both run interleaved, one timed step each per round, after warm-up rounds.
The ratio (deltadist / floor, median step time) is the overhead of attaching by hooks; run it on
two checkouts to compare them (same machine, same command).

    python benchmarks/lora_step.py [--rounds 30] [--warmup 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from report import report
from stepping import minilm_classifier, time_methods

TARGETS = ("query", "value")
RANK, ALPHA = 8, 16


class HandLoRALinear(nn.Module):
    """``y = W x + (alpha / r) B A x`` with ``W`` frozen: the floor a hook-based LoRA is held to."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(RANK, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, RANK))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
        self.scaling = ALPHA / RANK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)
        return self.base(x) + update * self.scaling


def hand_written() -> tuple[nn.Module, list[nn.Parameter]]:
    model = minilm_classifier()
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if name.rpartition(".")[2] in TARGETS and isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, HandLoRALinear(module))
    model.classifier.requires_grad_(True)
    return model, [p for p in model.parameters() if p.requires_grad]


def deltadist_lora() -> tuple[nn.Module, list[nn.Parameter]]:
    from deltadist import AutoDeltaConfig, AutoDeltaModel

    model = minilm_classifier()
    config = AutoDeltaConfig.from_dict({"delta_type": "lora", "modified_modules": list(TARGETS),
                                        "lora_r": RANK, "lora_alpha": ALPHA,
                                        "unfrozen_modules": ["deltas", "classifier"]})
    delta = AutoDeltaModel.from_config(config, backbone_model=model)
    delta.freeze_module(set_state_dict=False)
    return model, list(delta.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    methods = {"hand-written LoRA (floor)": hand_written, "deltadist LoRA": deltadist_lora}
    times, trainable = time_methods(methods, args.rounds, args.warmup, device)
    medians = {name: statistics.median(t) for name, t in times.items()}
    floor = medians["hand-written LoRA (floor)"]
    rows = [(name, f"{trainable[name]:,}", f"{median * 1e3:.1f}", f"{median / floor:.3f}x")
            for name, median in medians.items()]
    report("lora_step", f"LoRA r={RANK} training step, MiniLM-L6 classifier, batch 32x64, {args.device}, "
                        f"{args.rounds} interleaved rounds",
           ("method", "trainable params", "median step ms", "time vs floor"), rows,
           {"device": args.device, "rounds": args.rounds, "seconds": times, "median": medians,
            "ratio_to_floor": medians["deltadist LoRA"] / floor, "torch": torch.__version__},
           {name: m / floor for name, m in medians.items()}, "step time / hand-written LoRA")


if __name__ == "__main__":
    main()
