"""Attaching deltas to a Llama-3-70B-shaped model built on the meta device: deltadist vs PEFT.

The model (hidden 8192, 80 layers, 64 heads, 8 KV heads, intermediate 28672, vocab 128256) is
built on ``meta`` -- no memory for weights -- so what is timed is the library's own work: finding
the sites, sizing and creating the delta parameters, wiring, freezing. Each row is timed on a
fresh model (building it is not timed), rows interleaved over the rounds; the median is reported
with the growth of resident memory. Targets (issue 9): adapters after ``o_proj`` and
``down_proj`` <= 0.25 s, LoRA on all seven projections <= 0.10 s, BitFit <= 0.25 s, memory growth
<= 100 MiB.

    python benchmarks/meta_attach.py [--rounds 5]

PEFT is optional (``pip install peft``); without it its rows say so.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import time
from typing import Callable

import torch
from torch import nn

from big_models import PROJECTIONS, llama_70b_on_meta
from report import missing_peer, report

TARGETS_S = {"deltadist LoRA, 7 projections": 0.10, "deltadist adapters, o_proj + down_proj": 0.25,
             "deltadist BitFit": 0.25}
MEMORY_TARGET_MIB = 100


def deltadist_row(delta_type: str, **kwargs: object) -> Callable[[nn.Module], None]:
    def attach_and_freeze(model: nn.Module) -> None:
        from deltadist import AutoDeltaModel

        AutoDeltaModel.from_config({"delta_type": delta_type, **kwargs}, backbone_model=model).freeze_module()

    return attach_and_freeze


def peft_lora(model: nn.Module) -> None:
    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS),
                   low_cpu_mem_usage=True)


ROWS: dict[str, Callable[[nn.Module], None]] = {
    "deltadist LoRA, 7 projections": deltadist_row("lora", lora_r=16, modified_modules=PROJECTIONS),
    "deltadist adapters, o_proj + down_proj": deltadist_row(
        "adapter", modified_modules=["o_proj", "down_proj"]),
    "deltadist BitFit": deltadist_row("bitfit"),
    "deltadist prefix, every attention": deltadist_row("prefix"),
    "deltadist soft prompt": deltadist_row("soft_prompt"),
    "PEFT LoRA, 7 projections": peft_lora,
}


def rss_mib() -> float:
    """Resident memory of this process (Linux ``/proc``)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = {k: fn for k, fn in ROWS.items() if not k.startswith("PEFT") or importlib.util.find_spec("peft")}
    times: dict[str, list[float]] = {name: [] for name in rows}
    growth: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.rounds + 1):  # the first round warms imports and caches up
        for name, attach in rows.items():
            model = llama_70b_on_meta()
            gc.collect()
            before = rss_mib()
            start = time.perf_counter()
            attach(model)
            times[name].append(time.perf_counter() - start)
            growth[name].append(rss_mib() - before)
            del model
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    memory = {name: max(values[1:]) for name, values in growth.items()}
    peft = medians.get("PEFT LoRA, 7 projections")
    table_rows = [
        [name, f"{medians[name]:.3f}", f"{TARGETS_S[name]:.2f}" if name in TARGETS_S else "-",
         f"{memory[name]:.0f}", f"{peft / medians[name]:.1f}x" if peft else "-"]
        for name in rows
    ]
    columns = ["method", "median s", "target s", "max RSS growth MiB", "speed vs PEFT"]
    table_rows += [missing_peer(name, "peft", columns) for name in ROWS if name not in rows]
    report(
        "meta_attach", "Attach + freeze on a Llama-3-70B shape built on meta (CPU)", columns, table_rows,
        {"rounds": args.rounds, "median_s": medians, "max_rss_growth_mib": memory,
         "targets_s": TARGETS_S, "memory_target_mib": MEMORY_TARGET_MIB, "torch": torch.__version__},
        medians, "median seconds (lower is better)",
    )


if __name__ == "__main__":
    main()
