"""Training step of every method: deltadist against the method's hand-written floor
(:mod:`benchmarks.floors`), PEFT where PEFT has the method, and full fine-tuning, on Llama-shaped
causal LMs (fp32, AdamW). Every run has its own model; runs step interleaved, one timed step each
per round, so all see the same machine state; ratios are taken round by round.

Memory is counted, not sampled (a CPU has no per-run allocator peak): the bytes autograd saves for
the backward of one step (activations) plus the trained parameters' values, gradients and AdamW
state.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from benchmarks.floors import floor_loss, with_floor
from benchmarks.models import SMALL_MODELS, training_batch
from benchmarks.peer_worker import METHODS_OF
from benchmarks.peers import PEERS, PeerRun, environment
from benchmarks.stepping import interleave, training_step
from benchmarks.suite import Check, Ratio, Result

PROMPT_TOKENS = 16
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"delta_type": "lora", "lora_r": 8, "lora_alpha": 16},
    "dora": {"delta_type": "lora", "lora_r": 8, "lora_alpha": 16, "use_dora": True},
    "bitfit": {"delta_type": "bitfit"},
    "adapter": {"delta_type": "adapter", "bottleneck_dim": 16},
    "low_rank_adapter": {"delta_type": "low_rank_adapter"},
    "compacter": {"delta_type": "compacter"},
    "parallel_adapter": {"delta_type": "parallel_adapter", "modified_modules": ["mlp"], "bottleneck_dim": 16,
                         "scaled": 2.0},
    "prefix": {"delta_type": "prefix", "prefix_token_num": PROMPT_TOKENS, "reparameterize": False},
    "soft_prompt": {"delta_type": "soft_prompt", "soft_token_num": PROMPT_TOKENS, "token_init": False},
}
"""Each method as deltadist builds it here (sites: the method's defaults unless named)."""

TARGET_TO_FLOOR = 1.03
"""Every method within 3% of its hand-written floor."""


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    rows: int
    tokens: int
    family: str = "llama"
    """``llama`` (a causal LM) or ``bert`` (a 4-class classifier)."""


SMALL_LLAMA = Shape("Llama h256 x4, batch 8x128", 256, 4, 8, 128)
QUICK = [SMALL_LLAMA, Shape("BERT h384 x6, batch 16x64", 384, 6, 16, 64, "bert")]
FULL = [SMALL_LLAMA, Shape("BERT h384 x6, batch 32x64", 384, 6, 32, 64, "bert"),
        Shape("Llama h512 x8, batch 8x256", 512, 8, 8, 256)]
BERT_METHODS = {**METHODS,
                "parallel_adapter": {**METHODS["parallel_adapter"], "modified_modules": ["attention"]}}
"""On BERT the parallel adapter sits beside each attention block."""


def methods_of(shape: Shape) -> dict[str, dict[str, Any]]:
    return BERT_METHODS if shape.family == "bert" else METHODS


def backbone(shape: Shape) -> nn.Module:
    return SMALL_MODELS[shape.family](shape.hidden, shape.layers)


def batch_of(shape: Shape, vocab: int) -> dict[str, torch.Tensor]:
    return training_batch(shape.family, shape.rows, shape.tokens, vocab)


Run = tuple[nn.Module, list[nn.Parameter], Callable[[nn.Module, torch.Tensor], torch.Tensor]]


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def deltadist_run(base: nn.Module, method: str, config: dict[str, Any]) -> tuple[Run, list[str]]:
    from deltadist import AutoDeltaConfig, AutoDeltaModel

    model = copy.deepcopy(base)
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict({**config, "unfrozen_modules": ["deltas"]}),
                                       backbone_model=model)
    delta.freeze_module(set_state_dict=False)
    return (model, list(delta.parameters()), _loss), list(delta.sites)


def floor_run(base: nn.Module, method: str, config: dict[str, Any], sites: list[str]) -> Run:
    from deltadist import AutoDeltaConfig

    model = copy.deepcopy(base)
    full_config = dataclasses.asdict(AutoDeltaConfig.from_dict(config))  # with deltadist's defaults
    params = with_floor(method, model, sites, full_config)
    return model, params, lambda m, batch: floor_loss(method, m, batch)


def peft_run(base: nn.Module, method: str, shape: Shape, batch: dict[str, torch.Tensor]) -> Run | str:
    """PEFT's own version of ``method``, or why there is none (it is tried once on ``batch``)."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    targets = ["q_proj", "v_proj"] if shape.family == "llama" else ["query", "value"]
    task = "CAUSAL_LM" if shape.family == "llama" else None
    prompt_task = task or "SEQ_CLS"  # PEFT's prompt methods need a task; its head copy is frozen below
    configs = {
        "lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type=task),
        "dora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type=task, use_dora=True),
        "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=PROMPT_TOKENS, task_type=prompt_task),
        "soft_prompt": lambda: PromptTuningConfig(num_virtual_tokens=PROMPT_TOKENS, task_type=prompt_task),
    }
    if method not in configs:
        return "PEFT has no such method"
    try:
        model = get_peft_model(copy.deepcopy(base), configs[method]())
        with torch.no_grad():
            model(**batch)
    except ValueError as err:  # e.g. prefix tuning on an encoder
        return _short(f"could not run: {err}")
    for name, param in model.named_parameters():
        if "modules_to_save" in name:  # SEQ_CLS trains a copy of the head; deltadist's runs do not
            param.requires_grad_(False)
    return model, [p for p in model.parameters() if p.requires_grad], _loss


def full_run(base: nn.Module) -> Run:
    model = copy.deepcopy(base)
    for param in model.parameters():
        param.requires_grad_(True)
    return model, list(model.parameters()), _loss


def counted_memory(run: Run, batch: dict[str, torch.Tensor]) -> float:
    """MiB a training step holds beyond the frozen weights: saved activations (unique storages)
    plus values, gradients and AdamW state of the trained parameters."""
    model, params, loss_of = run
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        # Detached: a saved output kept with its own grad_fn would form a cycle autograd never frees.
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of(model, batch)
    del loss
    state = 4 * sum(p.numel() * p.element_size() for p in params)  # value, grad, two moments
    frozen_ids = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(size for ptr, size in seen.items() if ptr not in frozen_ids)
    return (activations + state) / 2**20


def run(quick: bool) -> Result:
    peft = importlib.util.find_spec("peft") is not None
    rounds, warmup = (8, 2) if quick else (20, 3)
    envs = {peer: environment(peer) for peer in PEERS}
    peer_labels = ["PEFT", *(PEERS[p]["label"] for p in PEERS)]
    rows, bars, checks, data = [], {}, [], {}
    for shape in QUICK if quick else FULL:
        base, methods = backbone(shape), methods_of(shape)
        batch = batch_of(shape, base.config.vocab_size)
        runs: dict[str, Run] = {"full fine-tuning": full_run(base)}
        peft_why_not: dict[tuple[str, str], str] = {}
        for method, config in methods.items():
            runs[f"{method} deltadist"], sites = deltadist_run(base, method, config)
            runs[f"{method} floor"] = floor_run(base, method, config, sites)
            if peft:
                peer = peft_run(base, method, shape, batch)
                if isinstance(peer, str):
                    peft_why_not[("PEFT", method)] = peer
                else:
                    runs[f"{method} PEFT"] = peer
        memory = {name: counted_memory(r, batch) for name, r in runs.items()}
        steps: dict[str, Callable[[], float]] = {
            name: training_step(model, torch.optim.AdamW(params, lr=1e-4), lambda m, f=loss_of: f(m, batch),
                                torch.device("cpu")) for name, (model, params, loss_of) in runs.items()}
        remote, why_not = _peer_steps(envs, shape)
        why_not.update(peft_why_not)
        steps.update(remote)
        try:
            times = interleave(steps, rounds, warmup)
        finally:
            for step in remote.values():
                step.close()
        full = times["full fine-tuning"]
        for method in methods:
            floor = times[f"{method} floor"]
            mine = Ratio.of(times[f"{method} deltadist"], floor)
            peers = {label: Ratio.of(times[f"{method} {label}"], floor) for label in peer_labels
                     if f"{method} {label}" in times}
            bars[f"{method}\n{shape.name.split(',')[0]}"] = {"deltadist": mine, **peers,
                                                              "full FT": Ratio.of(full, floor)}
            cells = [str(peers[label]) if label in peers else why_not.get((label, method), "not measured")
                     for label in peer_labels]
            rows.append([shape.name.split(",")[0], method, f"{statistics.median(floor) * 1e3:.1f}", str(mine),
                         *cells, f"{statistics.median(full) / statistics.median(floor):.2f}x",
                         f"{memory[f'{method} deltadist']:.0f} / {memory[f'{method} floor']:.0f}"])
            checks.append(Check(f"{shape.name}: {method} / floor", mine.value, TARGET_TO_FLOOR, mine.noise))
            if peers:  # no slower than the fastest peer
                fastest = min(peers, key=lambda label: peers[label].value)
                versus = Ratio.of(times[f"{method} deltadist"], times[f"{method} {fastest}"])
                checks.append(Check(f"{shape.name}: {method} / {fastest} (fastest peer)", versus.value, 1.0,
                                    versus.noise))
        data[shape.name] = {"seconds": times, "counted_memory_mib": memory}
    if not peft:
        why = "not measured: peft is not installed (pip install peft)"
        rows = [[*row[:4], why if row[4] == "not measured" else row[4], *row[5:]] for row in rows]
    return Result(
        name="method_step",
        title=f"Training step per method vs its hand-written floor (CPU, fp32, AdamW, {rounds} rounds)",
        columns=["model", "method", "floor ms", "deltadist / floor",
                 *(f"{label} / floor" for label in peer_labels),
                 "full FT / floor", "MiB deltadist / floor"],
        rows=rows, data=data, bars=bars, bar_label="step time / floor", checks=checks,
        notes=["Ratios are medians of per-round ratios (interleaved rounds; peers in their own "
               "environments step in worker processes between deltadist's steps); MiB counts saved "
               "activations plus trained values, gradients and AdamW state. A peer's cell says why where "
               "it has no such method or could not run. Where deltadist misses its floor and why: "
               "docs/benchmarks.md."])


def _peer_steps(envs: dict[str, Path | str],
                shape: Shape) -> tuple[dict[str, PeerRun], dict[tuple[str, str], str]]:
    """Each peer's worker per method it has, and why the others are not measured."""
    steps, why_not = {}, {}
    for peer, python in envs.items():
        label = PEERS[peer]["label"]
        for method in METHODS:
            if isinstance(python, str):
                why_not[(label, method)] = f"not measured: {python}"
            elif method not in METHODS_OF[peer]:
                why_not[(label, method)] = f"{label} has no such method"
            else:
                spec = {"peer": peer, "method": method, "family": shape.family, "hidden": shape.hidden,
                        "layers": shape.layers, "rows": shape.rows, "tokens": shape.tokens,
                        "prompt_tokens": PROMPT_TOKENS, "threads": torch.get_num_threads()}
                step = PeerRun(python, spec)
                if step.error:
                    why_not[(label, method)] = _short(f"could not run: {step.error}")
                else:
                    steps[f"{method} {label}"] = step
    return steps, why_not


def _short(reason: str, limit: int = 90) -> str:
    """A reason that fits a table cell."""
    return reason if len(reason) <= limit else reason[:limit - 1] + "…"
