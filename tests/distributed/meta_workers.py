"""Rank functions comparing the meta-device setup (``prepare_model``) with the real-weight path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DELTA = {"delta_type": "lora", "lora_r": 4}
DELTA_SEED = 7


def _model(config=None):
    from tests.tiny import build_tiny

    if config is None:
        return build_tiny("llama", "cls", tie_word_embeddings=False)
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_config(config)


def _step_and_report(prepared_model, delta, rank: int, world_size: int) -> dict:
    """Logits on the whole batch, one SGD step on this rank's half, then the delta's values."""
    from tests.tiny import tiny_inputs

    inputs = tiny_inputs("llama", batch=4, seq=8, seed=3)
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        logits = prepared_model(**inputs).logits
    half = slice(rank * 4 // world_size, (rank + 1) * 4 // world_size)
    optimizer = torch.optim.SGD(delta.parameters(), lr=0.1)
    out = prepared_model(**{k: v[half] for k, v in inputs.items()}).logits
    F.cross_entropy(out, labels[half]).backward()
    optimizer.step()
    return {"engine": delta.engine.name, "logits": logits, "delta": delta.state_dict()}


def both_paths(rank: int, world_size: int, engine: str, weights: str, delta=DELTA) -> dict:
    """The real-weight path and the meta path, one after the other in the same ranks."""
    return {"real": real_path(rank, world_size, engine, delta),
            "meta": meta_path(rank, world_size, engine, weights, delta)}


def both_paths_for_each(rank: int, world_size: int, engine: str, weights: str, deltas: dict) -> dict:
    """:func:`both_paths` for each delta config of ``deltas`` (name -> config), in one launch."""
    return {name: both_paths(rank, world_size, engine, weights, delta) for name, delta in deltas.items()}


def real_path(rank: int, world_size: int, engine: str, delta_config=DELTA) -> dict:
    from deltadist import AutoDeltaModel, wrap_model

    model = _model()
    torch.manual_seed(DELTA_SEED)
    delta = AutoDeltaModel.from_config(delta_config, backbone_model=model)
    delta.freeze_module()
    wrapped = wrap_model(model, engine, torch.device("cpu"))
    return _step_and_report(wrapped, delta, rank, world_size)


def meta_path(rank: int, world_size: int, engine: str, weights: str, delta_config=DELTA) -> dict:
    from deltadist import prepare_model

    config = _model().config
    prepared = prepare_model(lambda: _model(config), delta_config, engine, weights, delta_seed=DELTA_SEED)
    on_meta = [n for n, p in prepared.backbone.named_parameters() if p.is_meta]
    assert not on_meta, on_meta
    return _step_and_report(prepared.model, prepared.delta, rank, world_size)


def freeze_after_wrapping(rank: int, world_size: int, engine: str) -> dict:
    """Attach, wrap, and only then freeze; train two steps; report which parameters got gradients."""
    from deltadist import LoraModel, wrap_model

    model = _model()
    torch.manual_seed(DELTA_SEED)
    delta = LoraModel(model, lora_r=DELTA["lora_r"])
    wrapped = wrap_model(model, engine, torch.device("cpu"))
    delta.freeze_module()
    reports = []
    for _ in range(2):
        report = _step_and_report(wrapped, delta, rank, world_size)
        reports.append(report)
    with_grad = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    return {"with_grad": with_grad, "trainable": trainable, "delta": reports[-1]["delta"]}


def optimizer_built_after_a_forward(rank: int, world_size: int) -> dict:
    """FSDP2 leaves the root unsharded after a forward; delta.parameters() must still list the
    sharded parameters, or an optimizer built then would update copies that are thrown away."""
    from deltadist import LoraModel, wrap_model

    model = _model()
    torch.manual_seed(DELTA_SEED)
    delta = LoraModel(model, lora_r=DELTA["lora_r"], unfrozen_modules=["deltas", "score"])
    delta.freeze_module()
    wrapped = wrap_model(model, "fsdp2", torch.device("cpu"))
    before = delta.state_dict()
    report = _step_and_report(wrapped, delta, rank, world_size)  # forward first, then the optimizer
    kinds = sorted({type(p).__name__ for p in delta.parameters()})
    return {"before": before, "after": report["delta"], "kinds": kinds,
            "class": delta.engine.model_class_name(model)}


def tied_lm(rank: int, world_size: int, engine: str, weights: str) -> dict:
    """prepare_model on a causal LM with tied input/output embeddings (stored once on disk)."""
    from transformers import AutoModelForCausalLM

    from deltadist import prepare_model
    from tests.tiny import build_tiny

    reference = build_tiny("llama", "lm", tie_word_embeddings=True)
    prepared = prepare_model(lambda: AutoModelForCausalLM.from_config(reference.config),
                             DELTA, engine, weights, delta_seed=DELTA_SEED)
    inputs = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return {"got": prepared.model(input_ids=inputs).logits,
                "want": reference(input_ids=inputs).logits}
