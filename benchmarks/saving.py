"""Saving the delta as the backbone grows 10x and the delta does not, per engine, at world size 2
on the CPU: ``save_finetuned`` against PEFT's ``save_pretrained`` the way accelerate saves a PEFT
model under that engine, and against the engine's own full state dict.

A Llama (hidden 512, vocab 2000) with 2 and then 20 layers carries LoRA r=4 on ``q_proj`` and
``v_proj`` of the first two layers only (deltadist's, and PEFT's on a second copy), so the delta
is the same size at both depths. Reported for rank 0: median seconds and peak extra resident
memory (sampled) of each way of saving; the growth from 2 to 20 layers says whether a cost follows
the delta or the backbone.

PEFT under an engine is saved as ``accelerate`` does it (``Accelerator.get_state_dict`` then
``save_pretrained(state_dict=...)`` on the main process): under DDP PEFT reads its own tensors;
under FSDP the full state dict is gathered (FSDP2: ``get_model_state_dict`` with ``full_state_dict``
and ``cpu_offload``; FSDP1 in place, as its CPU-offload paths crash on the CPU); under ZeRO-2 every
tensor is cloned; under ZeRO-3 the 16-bit consolidated state dict is gathered. accelerate itself
runs only DDP on a CPU, so those calls are made here directly.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any, Callable

import torch

from benchmarks.engines import deepspeed_runner, join
from benchmarks.models import small_llama
from benchmarks.ranks import launch, peak_extra_rss
from benchmarks.suite import Check, Ratio, Result

ENGINES = ("ddp", "fsdp2", "fsdp1", "zero2", "zero3")
DEPTHS = (2, 20)
SITES = [f"layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
TARGET_GROWTH = 2.0
"""deltadist's save may cost at most this much more at 10x the backbone (it should cost the same)."""


def _wrapped(model: torch.nn.Module, params: list[torch.nn.Parameter], engine: str, deepspeed: Any) -> Any:
    from deltadist import wrap_model

    if deepspeed is None:
        return wrap_model(model, engine, torch.device("cpu"))
    return deepspeed_runner(deepspeed, model, params, int(engine[-1]), 1)


def full_state_dict(wrapped: Any, engine: str) -> Callable[[], dict[str, torch.Tensor]]:
    """The engine's full state dict on rank 0, as accelerate's ``get_state_dict`` takes it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if engine == "zero3":
        return wrapped._zero3_consolidated_16bit_state_dict
    if engine in ("ddp", "zero2"):
        return lambda: {k: v.clone() for k, v in wrapped.module.state_dict().items()}
    # FSDP1's CPU-offload state-dict paths crash on the CPU; its full state dict is gathered in place.
    options = StateDictOptions(full_state_dict=True, cpu_offload=engine != "fsdp1")
    return lambda: get_model_state_dict(wrapped, options=options)


def _peft_save(peft_model: Any, wrapped: Any, engine: str, rank: int, path: str) -> Callable[[], None]:
    """PEFT's ``save_pretrained`` on the main process, given the state dict accelerate would pass."""
    if engine == "ddp":  # accelerate unwraps the model and PEFT reads its own tensors
        return lambda: peft_model.save_pretrained(path) if rank == 0 else None
    gather = full_state_dict(wrapped, engine)

    def save() -> None:
        state = gather()
        if rank == 0:
            peft_model.save_pretrained(path, state_dict=state)

    return save


def rank_main(rank: int, world_size: int, engine: str, layers: int, repeats: int) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    from deltadist import LoraModel

    deepspeed = join(engine)
    model = small_llama(512, layers)
    delta = LoraModel(model, lora_r=4, modified_modules=SITES, unfrozen_modules=["deltas"])
    delta.freeze_module(set_state_dict=False)
    # Counted before wrapping: ZeRO-3 leaves every parameter empty on the module.
    backbone = sum(p.numel() for n, p in model.named_parameters() if ".lora" not in n)
    delta_params = sum(p.numel() for p in delta.delta_parameters().values())
    wrapped = _wrapped(model, list(delta.parameters()), engine, deepspeed)
    peft_model = get_peft_model(small_llama(512, layers), LoraConfig(r=4, lora_alpha=8, target_modules=SITES))
    peft_wrapped = _wrapped(peft_model, [p for p in peft_model.parameters() if p.requires_grad], engine,
                            deepspeed)
    ways = ("save_finetuned", "PEFT save_pretrained", "engine full state dict")
    results = {way: {"s": [], "bytes": []} for way in ways}
    with tempfile.TemporaryDirectory() as tmp:
        saves = {"save_finetuned": lambda: delta.save_finetuned(f"{tmp}/deltadist"),
                 "PEFT save_pretrained": _peft_save(peft_model, peft_wrapped, engine, rank, f"{tmp}/peft"),
                 "engine full state dict": full_state_dict(wrapped, engine)}
        for _ in range(repeats):
            for name, save in saves.items():
                torch.distributed.barrier()
                start = time.perf_counter()
                results[name]["bytes"].append(peak_extra_rss(save))
                results[name]["s"].append(time.perf_counter() - start)
    torch.distributed.destroy_process_group()
    return {"results": results, "backbone_params": backbone, "delta_params": delta_params}


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
               "milliseconds; its memory does not grow. PEFT's save_pretrained follows the delta under "
               "DDP only: under FSDP and ZeRO the state dict accelerate hands it is the whole model's, "
               "gathered to rank 0 first. Peak MiB is sampled resident memory: memory the process "
               "freed earlier and reuses does not show, so small differences mean little."])
