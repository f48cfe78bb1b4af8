"""A training step under each engine at world size 2 on the CPU (gloo): LoRA and an adapter
against full fine-tuning under the same engine -- DDP, FSDP2, FSDP1 (``deltadist.wrap_model``),
DeepSpeed ZeRO-2 and ZeRO-3 (``deepspeed.initialize``, a torch AdamW).

Each launch builds the three contenders on both ranks and steps them interleaved over the rounds
(every rank in the same order, so the collectives line up); each rank trains on its own half of
the batch. Reported for rank 0: median step time, the ratio to full fine-tuning, and the peak
resident memory that building, wrapping and one step of the contender added (sampled).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable

import torch

from benchmarks.models import small_llama
from benchmarks.ranks import launch, peak_extra_rss
from benchmarks.stepping import interleave, training_step
from benchmarks.suite import Ratio, Result

ENGINES = ("ddp", "fsdp2", "fsdp1", "zero2", "zero3")
CONTENDERS = {"lora": {"delta_type": "lora", "lora_r": 8, "unfrozen_modules": ["deltas"]},
              "adapter": {"delta_type": "adapter", "bottleneck_dim": 16, "unfrozen_modules": ["deltas"]},
              "full fine-tuning": None}


def join(engine: str) -> Any:
    """The process group (DeepSpeed's, for ZeRO), from the launch's environment."""
    if engine.startswith("zero"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        return deepspeed
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return None


def deepspeed_runner(deepspeed: Any, model: torch.nn.Module, params: list[torch.nn.Parameter], stage: int,
                     micro_batch: int) -> Any:
    """``model`` under DeepSpeed ZeRO ``stage`` with a torch AdamW over ``params`` (no clipping;
    under ZeRO-3 every parameter is partitioned, none kept whole)."""
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
              "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0}
                                                        if stage == 3 else {})}}
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    runner, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return runner


def _contender(base: torch.nn.Module, config: dict[str, Any] | None, engine: str, deepspeed: Any,
               ids: torch.Tensor) -> Callable[[], float]:
    """One contender built, wrapped by ``engine`` and ready to step (timed)."""
    from deltadist import AutoDeltaModel, wrap_model

    model = copy.deepcopy(base)
    delta = None
    if config is None:
        model.requires_grad_(True)
    else:
        delta = AutoDeltaModel.from_config(dict(config), backbone_model=model)
        delta.freeze_module(set_state_dict=False)
    params = (lambda: list(delta.parameters())) if delta else (lambda: list(model.parameters()))
    loss_of = lambda m: m(input_ids=ids, labels=ids).loss  # noqa: E731
    if deepspeed is None:
        wrapped = wrap_model(model, engine, torch.device("cpu"))
        return training_step(wrapped, torch.optim.AdamW(params(), lr=1e-4), loss_of, torch.device("cpu"))
    runner = deepspeed_runner(deepspeed, model, params(), int(engine[-1]), ids.shape[0])

    def step() -> float:
        import time

        start = time.perf_counter()
        loss = runner(input_ids=ids, labels=ids).loss
        runner.backward(loss)
        runner.step()
        return time.perf_counter() - start

    return step


def rank_main(rank: int, world_size: int, engine: str, hidden: int, layers: int, tokens: int,
              rounds: int) -> dict[str, Any]:
    deepspeed = join(engine)
    base = small_llama(hidden, layers)
    ids = torch.randint(0, base.config.vocab_size, (4, tokens), generator=torch.Generator().manual_seed(rank))
    steps: dict[str, Callable[[], float]] = {}
    memory: dict[str, int] = {}
    # A contender built, stepped and dropped first takes the process's one-time costs (thread pools,
    # the allocator's first arenas, lazy imports) out of the first measured one.
    _contender(base, CONTENDERS["lora"], engine, deepspeed, ids)()
    for name, config in CONTENDERS.items():
        def build_and_step(name: str = name, config: dict[str, Any] | None = config) -> None:
            steps[name] = _contender(base, config, engine, deepspeed, ids)
            steps[name]()

        memory[name] = peak_extra_rss(build_and_step)
    return {"seconds": interleave(steps, rounds, warmup=1), "peak_extra_rss": memory}


def run(quick: bool) -> Result:
    hidden, layers, tokens, rounds = (256, 4, 128, 4) if quick else (512, 8, 256, 10)
    rows, bars, data = [], {}, {}
    for engine in ENGINES:
        try:
            ranks = launch(rank_main, 2, engine, hidden, layers, tokens, rounds)
        except Exception as err:  # an engine that cannot run here says why, the others go on
            rows.append([engine, "-", f"not measured: {type(err).__name__}: {str(err).splitlines()[0][:80]}",
                         "-", "-"])
            continue
        times, memory = ranks[0]["seconds"], ranks[0]["peak_extra_rss"]
        full = times["full fine-tuning"]
        bars[engine] = {}
        for name in CONTENDERS:
            ratio = Ratio.of(times[name], full)
            bars[engine][name] = ratio
            rows.append([engine, name, f"{Ratio.spread(times[name]).value * 1e3:.0f}", str(ratio),
                         f"{memory[name] / 2**20:.0f}"])
        data[engine] = ranks
    return Result(
        name="engines",
        title=f"Training step per engine, world size 2 on CPU (gloo), Llama h{hidden} x{layers}, "
              f"4 x {tokens} tokens a rank, {rounds} rounds",
        columns=["engine", "contender", "rank 0 median ms", "time / full fine-tuning",
                 "rank 0 peak MiB added"],
        rows=rows, data=data, bars=bars, bar_label="step time / full fine-tuning under the same engine",
        notes=["Peak MiB: resident memory that building, wrapping and one step of the contender added on "
               "rank 0 (sampled at ~1 kHz, after a throwaway contender took the one-time costs; the frozen "
               "weights are a copy of one in-process base model)."])
