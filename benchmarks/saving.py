"""Saving the delta as the backbone grows 10x and the delta does not, per engine, at world size 2
on the CPU: ``save_finetuned`` against the engine's own full state dict (what saving through the
engine costs before a delta could be filtered out of it).

A Llama (hidden 512, vocab 2000) with 2 and then 20 layers carries LoRA r=4 on ``q_proj`` and
``v_proj`` of the first two layers only, so the delta is the same size at both depths. Reported
for rank 0: median seconds and peak extra resident memory (sampled) of each way of saving; the
growth from 2 to 20 layers says whether a cost follows the delta or the backbone.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any, Callable

import torch

from benchmarks.method_step import Shape, llama
from benchmarks.ranks import launch, peak_extra_rss
from benchmarks.suite import Check, Ratio, Result

ENGINES = ("ddp", "fsdp2", "fsdp1")
DEPTHS = (2, 20)
TARGET_GROWTH = 2.0
"""deltadist's save may cost at most this much more at 10x the backbone (it should cost the same)."""


def _full_state_dict(model: torch.nn.Module, engine: str) -> Callable[[], Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if engine == "ddp":
        return lambda: {k: v.clone() for k, v in model.state_dict().items()}
    # FSDP1's CPU-offload state-dict paths crash on the CPU; its full state dict is gathered in place.
    options = StateDictOptions(full_state_dict=True, cpu_offload=engine != "fsdp1")
    return lambda: get_model_state_dict(model, options=options)


def rank_main(rank: int, world_size: int, engine: str, layers: int, repeats: int) -> dict[str, Any]:
    import torch.distributed as dist

    from deltadist import LoraModel, wrap_model

    dist.init_process_group("gloo")
    model = llama(Shape("", 512, layers, 1, 1))
    sites = [f"layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    delta = LoraModel(model, lora_r=4, modified_modules=sites, unfrozen_modules=["deltas"])
    delta.freeze_module(set_state_dict=False)
    wrapped = wrap_model(model, engine, torch.device("cpu"))
    results: dict[str, dict[str, list[float]]] = {"save_finetuned": {"s": [], "bytes": []},
                                                  "engine full state dict": {"s": [], "bytes": []}}
    with tempfile.TemporaryDirectory() as tmp:
        ways = {"save_finetuned": lambda: delta.save_finetuned(tmp),
                "engine full state dict": _full_state_dict(wrapped, engine)}
        for _ in range(repeats):
            for name, save in ways.items():
                dist.barrier()
                start = time.perf_counter()
                results[name]["bytes"].append(peak_extra_rss(save))
                results[name]["s"].append(time.perf_counter() - start)
    backbone = sum(p.numel() for n, p in model.named_parameters() if ".lora" not in n)
    dist.destroy_process_group()
    return {"results": results, "backbone_params": backbone,
            "delta_params": sum(p.numel() for p in delta.delta_parameters().values())}


def run(quick: bool) -> Result:
    repeats = 3 if quick else 7
    rows, bars, checks, data = [], {}, [], {}
    for engine in ENGINES:
        by_depth = {layers: launch(rank_main, 2, engine, layers, repeats)[0] for layers in DEPTHS}
        data[engine] = by_depth
        small, big = (by_depth[d]["results"] for d in DEPTHS)
        growth = by_depth[DEPTHS[1]]["backbone_params"] / by_depth[DEPTHS[0]]["backbone_params"]
        bars[engine] = {}
        for way in small:
            seconds = Ratio.of(big[way]["s"], small[way]["s"])
            bars[engine][way] = seconds
            rows.append([engine, way, *(f"{statistics.median(r[way]['s']) * 1e3:.1f}" for r in (small, big)),
                         str(seconds),
                         *(f"{statistics.median(r[way]['bytes']) / 2**20:.1f}" for r in (small, big))])
        mine = Ratio.of(big["save_finetuned"]["s"], small["save_finetuned"]["s"])
        checks.append(Check(f"{engine}: save_finetuned time at {growth:.0f}x the backbone", mine.value,
                            TARGET_GROWTH, mine.noise))
    delta_params = data[ENGINES[0]][DEPTHS[0]]["delta_params"]
    return Result(
        name="saving",
        title=f"Saving at world size 2 on CPU: Llama h512 with {DEPTHS[0]} vs {DEPTHS[1]} layers, "
              f"the same LoRA ({delta_params:,} values), {repeats} repeats",
        columns=["engine", "how", f"ms, {DEPTHS[0]} layers", f"ms, {DEPTHS[1]} layers", "time growth",
                 f"rank 0 peak MiB, {DEPTHS[0]} layers", f"rank 0 peak MiB, {DEPTHS[1]} layers"],
        rows=rows, data=data, bars=bars, bar_label=f"time at {DEPTHS[1]} layers / at {DEPTHS[0]}",
        checks=checks,
        notes=["save_finetuned fingerprints the backbone (16 samples of every tensor, summed in one "
               "collective per group), so its time grows with the number of backbone tensors by a few "
               "milliseconds; its memory does not grow. PEFT's save_pretrained through accelerate under "
               "the same engines is not measured yet."])
