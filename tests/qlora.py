"""A tiny Llama whose linear layers NF4 can store (rows of 128 values), and one QLoRA run of it:
``prepare_model(..., quantize="nf4")``, two SGD steps on a rank's share of a fixed batch."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WIDE = {"hidden_size": 256, "intermediate_size": 512, "tie_word_embeddings": False}
"""Config overrides of the tiny Llama: NF4's blocks of 64 values in 256 scaler blocks fit every
projection, also each rank's half of its rows."""
LORA = {"delta_type": "lora", "lora_r": 4, "modified_modules": ["q_proj", "v_proj", "down_proj"],
        "init_lora_weights": "gaussian"}
QLORA_DELTAS = {"lora": LORA, "dora": {**LORA, "use_dora": True},
                "adapter": {"delta_type": "adapter", "bottleneck_dim": 8, "modified_modules": ["mlp"]}}


def wide_llama() -> nn.Module:
    from tests.tiny import build_tiny

    return build_tiny("llama", "cls", **WIDE)


def qlora_run(engine: str, weights: str, delta_config: dict, rank: int = 0, world_size: int = 1,
              steps: int = 2) -> dict[str, Any]:
    """Logits of the whole batch after ``steps`` SGD steps on this rank's share, the delta's
    state, and what the backbone stores (quantized weight names, bits per parameter)."""
    from transformers import AutoModelForSequenceClassification

    from deltadist import prepare_model
    from deltadist.core.quantized import is_quantized, storage_bits
    from tests.tiny import tiny_inputs

    config = wide_llama().config
    prepared = prepare_model(lambda: AutoModelForSequenceClassification.from_config(config),
                             delta_config, engine, weights, delta_seed=3, quantize="nf4")
    inputs, labels = tiny_inputs("llama", batch=4, seq=8, seed=3), torch.tensor([0, 1, 2, 1])
    share = slice(rank * 4 // world_size, (rank + 1) * 4 // world_size)
    optimizer = torch.optim.SGD(prepared.delta.parameters(), lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        out = prepared.model(**{k: v[share] for k, v in inputs.items()}).logits
        F.cross_entropy(out, labels[share]).backward()
        optimizer.step()
    with torch.no_grad():
        logits = prepared.model(**inputs).logits
    engine_ = prepared.delta.engine
    return {
        "logits": logits, "delta": prepared.delta.state_dict(),
        "quantized": sorted(n for n, p in prepared.backbone.named_parameters() if is_quantized(p, engine_)),
        "with_grad": sorted(n for n, p in prepared.backbone.named_parameters() if p.grad is not None),
        "bits": storage_bits(prepared.backbone),
    }


def qlora_ranks(rank: int, world_size: int, engine: str, weights: str) -> dict[str, Any]:
    """:func:`qlora_run` of every :data:`QLORA_DELTAS` under ``engine``, in one launch."""
    return {name: qlora_run(engine, weights, config, rank, world_size)
            for name, config in QLORA_DELTAS.items()}
