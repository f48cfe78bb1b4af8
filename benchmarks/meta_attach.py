"""Attaching deltas to 8B- and 70B-shaped Llamas built on the meta device: every method, and PEFT.

The models are built on ``meta`` -- no memory for weights -- so what is timed is the library's own
work: finding the sites, sizing and creating the delta parameters, wiring, freezing. Each run is
timed on a fresh model (building it is not timed), runs interleaved over the rounds, with the
growth of resident memory. Targets on the 70B shape: LoRA <= 0.10 s, every other method <= 0.25 s,
memory growth <= 100 MiB.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import time
from typing import Callable

import torch
from torch import nn

from benchmarks.models import PROJECTIONS, llama_8b_on_meta, llama_70b_on_meta
from benchmarks.peer_worker import METHODS_OF
from benchmarks.peers import PeerRun, environment
from benchmarks.suite import Check, Ratio, Result

METHODS: dict[str, dict[str, object]] = {
    "lora": {"delta_type": "lora", "lora_r": 16, "modified_modules": PROJECTIONS},
    "bitfit": {"delta_type": "bitfit"},
    "adapter": {"delta_type": "adapter", "modified_modules": ["o_proj", "down_proj"]},
    "low_rank_adapter": {"delta_type": "low_rank_adapter"},
    "compacter": {"delta_type": "compacter"},
    "parallel_adapter": {"delta_type": "parallel_adapter"},
    "prefix": {"delta_type": "prefix"},
    "soft_prompt": {"delta_type": "soft_prompt"},
}
TARGET_S = {"lora": 0.10}
OTHER_TARGET_S = 0.25
MEMORY_TARGET_MIB = 100


def deltadist_attach(config: dict[str, object]) -> Callable[[nn.Module], None]:
    def attach_and_freeze(model: nn.Module) -> None:
        from deltadist import AutoDeltaModel

        AutoDeltaModel.from_config(dict(config), backbone_model=model).freeze_module()

    return attach_and_freeze


def peft_lora(model: nn.Module) -> None:
    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS), low_cpu_mem_usage=True)


def _timed_on(build: Callable[[], nn.Module],
              attach: Callable[[nn.Module], None]) -> Callable[[], tuple[float, float]]:
    """``(seconds, MiB of resident growth)`` of ``attach`` on a fresh model (built untimed)."""

    def step() -> tuple[float, float]:
        model = build()
        gc.collect()
        before, start = rss_mib(), time.perf_counter()
        attach(model)
        return time.perf_counter() - start, rss_mib() - before

    return step


def _adapterhub_steps(build: Callable[[], nn.Module]) -> tuple[dict[str, PeerRun], dict[str, str]]:
    """AdapterHub's attach per method it has, in its environment's worker; why not, per method."""
    python = environment("adapters")
    if isinstance(python, str):
        return {}, {method: f"not measured: {python}" for method in METHODS}
    config = build().config.to_dict()
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    steps: dict[str, PeerRun] = {}
    why_not = {m: "AdapterHub has no such method" for m in METHODS if m not in METHODS_OF["adapters"]}
    for method in METHODS_OF["adapters"]:
        step = PeerRun(python, {"task": "attach", "method": method, "threads": torch.get_num_threads(),
                                "config": {key: config[key] for key in keys}})
        if step.error:
            why_not[method] = f"could not run: {step.error}"[:90]
        else:
            steps[f"{method} AdapterHub"] = step
    return steps, why_not


def rss_mib() -> float:
    """Resident memory of this process (Linux ``/proc``)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(quick: bool) -> Result:
    rounds = 3 if quick else 5
    shapes = {"70B": llama_70b_on_meta} if quick else {"8B": llama_8b_on_meta, "70B": llama_70b_on_meta}
    peft = importlib.util.find_spec("peft") is not None
    attachers = {f"{method} deltadist": deltadist_attach(config) for method, config in METHODS.items()}
    if peft:
        attachers["lora PEFT"] = peft_lora
    rows, bars, checks, data = [], {}, [], {}
    for shape, build in shapes.items():
        steps = {name: _timed_on(build, attach) for name, attach in attachers.items()}
        remote, why_not = _adapterhub_steps(build)
        steps.update(remote)
        times: dict[str, list[float]] = {name: [] for name in steps}
        growth: dict[str, list[float]] = {name: [] for name in attachers}
        try:
            for round_index in range(rounds + 1):  # the first round warms imports and caches up
                for name, step in steps.items():
                    seconds, grown = step() if name in attachers else (step(), 0.0)
                    if round_index:
                        times[name].append(seconds)
                        if name in growth:
                            growth[name].append(grown)
        finally:
            for step in remote.values():
                step.close()
        for method in METHODS:
            mine = Ratio.spread(times[f"{method} deltadist"])
            peer = Ratio.spread(times["lora PEFT"]) if method == "lora" and peft else None
            hub = Ratio.spread(times[f"{method} AdapterHub"]) if f"{method} AdapterHub" in times else None
            target = TARGET_S.get(method, OTHER_TARGET_S)
            bars[f"{method}\n{shape}"] = {"deltadist": mine, **({"PEFT": peer} if peer else {}),
                                          **({"AdapterHub": hub} if hub else {})}
            rows.append([shape, method, f"{mine.value:.3f}", f"{target:.2f}" if shape == "70B" else "-",
                         f"{max(growth[f'{method} deltadist']):.0f}",
                         f"{peer.value:.3f} ({peer.value / mine.value:.1f}x slower)" if peer else
                         ("PEFT has no meta attach here" if method != "lora" else
                          "not measured: peft is not installed"),
                         f"{hub.value:.3f} ({hub.value / mine.value:.1f}x slower)" if hub else
                         why_not.get(method, "not measured")])
            if shape == "70B":
                checks.append(Check(f"70B {method} attach + freeze, s", mine.value, target, mine.noise))
                checks.append(Check(f"70B {method} memory growth, MiB", max(growth[f"{method} deltadist"]),
                                    MEMORY_TARGET_MIB, 0.0))
        data[shape] = {"seconds": times, "rss_growth_mib": growth}
    return Result(
        name="meta_attach", title=f"Attach + freeze on Llama shapes built on meta (CPU, {rounds} rounds)",
        columns=["shape", "method", "deltadist median s", "target s", "max RSS growth MiB", "PEFT median s",
                 "AdapterHub median s"],
        rows=rows, data=data, bars=bars, bar_label="seconds", checks=checks,
        notes=["AdapterHub (LoRA on q, k, v and both MLP projections; Houlsby adapters; Compacter; "
               "parallel adapters; prefix tuning with its default reparameterizing MLP) attaches in its own "
               "environment's worker, its modules created on meta like the model's; its build is not timed "
               "either."])
