"""Many tasks in one batch: a forward and a training step over one batch whose rows use k
different LoRA deltas, against one delta for the whole batch and against PEFT's ``adapter_names``
(forward; PEFT does not train mixed batches), on the CPU.

A small Llama (hidden 512, 4 layers) carries 64 LoRA deltas (r=16 on all seven projections, so the
deltas' share of the work is visible); a batch is 32 rows x 32 tokens, rows dealt round-robin over
k = 1, 4, 16 and 64 deltas (all attached; the unlisted ones serve no row). Runs are interleaved
over the rounds and each is compared round by round with deltadist's one-delta batch.

Target: k = 64 within 1.3x of one delta, forward and training step.
"""

from __future__ import annotations

import copy
import importlib.util
import time
from typing import Callable

import torch
from torch import nn

from benchmarks.suite import Check, Ratio, Result

DELTAS, BATCH, SEQ, RANK = 64, 32, 32, 16
KS = (1, 4, 16, 64)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_RATIO_AT_64 = 1.3


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
    one = lora(single)
    model = copy.deepcopy(base)
    deltas = [lora(model) for _ in range(DELTAS)]

    def mixed(k: int, train: bool) -> Callable[[], object]:
        rows = [deltas[i % k] for i in range(BATCH)]
        step = training_step(model, [p for d in deltas[:k] for p in d.parameters()], inputs)

        def run() -> object:
            with deltadist.mixed_batch(rows):
                return step() if train else model(**inputs)

        return run

    one_step = training_step(single, list(one.parameters()), inputs)
    return {"forward, deltadist one delta": lambda: single(**inputs),
            **{f"forward, deltadist mixed k={k}": mixed(k, False) for k in KS},
            "train step, deltadist one delta": one_step,
            **{f"train step, deltadist mixed k={k}": mixed(k, True) for k in KS}}


def training_step(model: nn.Module, params: list[nn.Parameter], inputs: dict) -> Callable[[], object]:
    """One SGD step of ``params`` on the batch's causal LM loss (grad enabled inside)."""
    optimizer = torch.optim.SGD(params, lr=1e-4)

    def step() -> object:
        with torch.enable_grad():
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


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

    return {"forward, PEFT one adapter": lambda: peft_model(**inputs),
            **{f"forward, PEFT adapter_names k={k}": named(k) for k in KS}}


def run(quick: bool) -> Result:
    rounds = 5 if quick else 15
    inputs = {"input_ids": torch.randint(3, 1000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))}
    base = backbone()
    runs = deltadist_rows(base, inputs)
    peft = importlib.util.find_spec("peft") is not None
    if peft:
        runs.update(peft_rows(copy.deepcopy(base), inputs))
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for round_index in range(rounds + 1):  # the first round warms up
            for name, step in runs.items():
                start = time.perf_counter()
                step()
                if round_index:
                    times[name].append(time.perf_counter() - start)
    rows, bars, checks = [], {}, []
    for kind in ("forward", "train step"):
        one = times[f"{kind}, deltadist one delta"]
        for k in KS:
            mine = Ratio.of(times[f"{kind}, deltadist mixed k={k}"], one)
            peer_name = f"{kind}, PEFT adapter_names k={k}"
            peer = Ratio.of(times[peer_name], one) if peer_name in times else None
            bars[f"{kind}\nk={k}"] = {"deltadist": mine, **({"PEFT adapter_names": peer} if peer else {})}
            rows.append([kind, k, f"{sorted(times[f'{kind}, deltadist mixed k={k}'])[rounds // 2] * 1e3:.0f}",
                         str(mine), str(peer) if peer else
                         ("PEFT trains no mixed batch" if kind == "train step" else
                          "not measured: peft is not installed")])
            if k == KS[-1]:
                checks.append(Check(f"{kind}, k={k} / one delta", mine.value, TARGET_RATIO_AT_64, mine.noise))
    return Result(
        name="mixed_batch",
        title=f"{BATCH} rows x {SEQ} tokens over k LoRA deltas (Llama h512 x4, r={RANK} on 7 projections, "
              f"CPU, {rounds} rounds)",
        columns=["what", "k", "deltadist ms", "deltadist / one delta", "PEFT / deltadist one delta"],
        rows=rows, data={"rounds": rounds, "seconds": times}, bars=bars, bar_label="time / one delta",
        checks=checks,
        notes=["The one-delta baseline has one delta attached, the mixed runs 64. What k = 64 costs beyond "
               "it: every attached delta's hook still runs on each of the 28 sites and returns at once "
               "when it serves no row of the call, and the grouped product copies each row's A and B."])
