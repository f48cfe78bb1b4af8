"""A peer library's training step in its own virtual environment, stepped by the benchmark.

Run as ``<venv>/bin/python -m benchmarks.peer_worker '<json spec>'`` (by :mod:`benchmarks.peers`).
It builds the model of the spec (:mod:`benchmarks.models`) with the peer's version of the method,
answers ``ready`` (or ``error: ...``), then for each ``step`` line on stdin runs one training step
and answers its seconds; ``quit`` ends it. It imports only torch, transformers and the peer (never deltadist).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

from benchmarks.models import SMALL_MODELS, training_batch


def adapterhub_config(method: str, spec: dict[str, Any]) -> Any:
    """AdapterHub's config closest to deltadist's for ``method``: sized from the spec for a training
    step; for an attach on meta (``spec["task"] == "attach"``) as meta_attach configures deltadist
    (LoRA on q, k, v and both MLP projections, reduction 16) with AdapterHub's own other defaults."""
    from adapters import (
        CompacterConfig,
        DoubleSeqBnConfig,
        LoRAConfig,
        ParBnConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
    )

    configs: dict[str, Callable[[], Any]]
    if spec.get("task") == "attach":
        configs = {"lora": lambda: LoRAConfig(r=16, alpha=32, attn_matrices=["q", "k", "v"],
                                              intermediate_lora=True, output_lora=True),
                   "adapter": lambda: DoubleSeqBnConfig(reduction_factor=16),
                   "compacter": lambda: CompacterConfig(reduction_factor=16, phm_dim=4),
                   "parallel_adapter": lambda: ParBnConfig(reduction_factor=16),
                   "prefix": lambda: PrefixTuningConfig(),  # 30 tokens through a reparameterizing MLP
                   "soft_prompt": lambda: PromptTuningConfig()}
    else:
        reduction = spec["hidden"] // 16
        configs = {
            "lora": lambda: LoRAConfig(r=8, alpha=16, attn_matrices=["q", "v"]),
            "adapter": lambda: DoubleSeqBnConfig(reduction_factor=reduction),  # after attention and FFN
            "compacter": lambda: CompacterConfig(reduction_factor=16, phm_dim=4),
            "parallel_adapter": lambda: ParBnConfig(reduction_factor=reduction, scaling=2.0),
            "prefix": lambda: PrefixTuningConfig(prefix_length=spec["prompt_tokens"], flat=True),
            "soft_prompt": lambda: PromptTuningConfig(prompt_length=spec["prompt_tokens"]),
        }
    return configs[method]()


def adapterhub(model: nn.Module, method: str, spec: dict[str, Any]) -> None:
    """AdapterHub's ``adapters`` on ``model``, the rest of the model frozen."""
    import adapters

    adapters.init(model)
    model.add_adapter("bench", config=adapterhub_config(method, spec))
    model.train_adapter("bench")


def opendelta(model: nn.Module, method: str, spec: dict[str, Any]) -> None:
    """OpenDelta 0.3.2's models, on the sites deltadist uses (OpenDelta has no structure map of
    Llama, so they are named; on BERT its own defaults, the same roles as deltadist's)."""
    import opendelta

    llama = spec["family"] == "llama"
    sites = {"modified_modules": ["o_proj", "down_proj"]} if llama else {}
    builders: dict[str, Callable[[], Any]] = {
        "lora": lambda: opendelta.LoraModel(model, lora_r=8, lora_alpha=16,
                                            modified_modules=["q_proj", "v_proj"] if llama else None),
        "bitfit": lambda: opendelta.BitFitModel(model, modified_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "input_layernorm",
            "post_attention_layernorm"] if llama else None),
        "adapter": lambda: opendelta.AdapterModel(model, bottleneck_dim=16, **sites),
        "low_rank_adapter": lambda: opendelta.LowRankAdapterModel(model, **sites),
        "compacter": lambda: opendelta.CompacterModel(model, **sites),
        "parallel_adapter": lambda: opendelta.ParallelAdapterModel(
            model, bottleneck_dim=16, modified_modules=["mlp"] if llama else ["attention"]),
    }
    delta = builders[method]()
    delta.freeze_module(exclude=["deltas"])


def adapterhub_attach(spec: dict[str, Any]) -> Callable[[], float]:
    """Seconds to attach AdapterHub's ``method`` (created on meta, like the model) to a fresh
    Llama of the spec's shape built on the meta device (the build is not timed; tried once first)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**spec["config"])

    def attach() -> float:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
            start = time.perf_counter()
            adapterhub(model, spec["method"], spec)
            return time.perf_counter() - start

    attach()  # once untimed, so that a failure shows before the first timed attach
    return attach


PEERS = {"adapters": adapterhub, "opendelta": opendelta}
METHODS_OF = {"adapters": ("lora", "adapter", "compacter", "parallel_adapter", "prefix", "soft_prompt"),
              "opendelta": ("lora", "bitfit", "adapter", "low_rank_adapter", "compacter", "parallel_adapter")}
"""The methods each peer has (as configured above)."""


def training_step(spec: dict[str, Any]) -> Callable[[], float]:
    """Seconds of one training step of the peer's ``method`` on the spec's model (built here, and
    run once untimed so that a failure shows before the first timed step)."""
    model = SMALL_MODELS[spec["family"]](spec["hidden"], spec["layers"])
    PEERS[spec["peer"]](model, spec["method"], spec)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = training_batch(spec["family"], spec["rows"], spec["tokens"], model.config.vocab_size)

    def step() -> float:
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()
    return step


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    try:
        step = adapterhub_attach(spec) if spec.get("task") == "attach" else training_step(spec)
    except Exception as err:  # the peer cannot do it: say why, one line
        print(f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", flush=True)
        return
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        print(f"{step():.9f}", flush=True)


if __name__ == "__main__":
    main()
