"""Rank functions for ``test_lora_variants_engines.py``: LoRA's variants hot-swapped in a wrapped model.

Importable by spawned children (``tests.distributed.variant_workers``); the wrapping is
``workers.wrap``'s (DDP, FSDP2, FSDP1) or ``test_deepspeed``'s ``deepspeed.initialize`` (``zero2``,
``zero3``), the saved deltas and their logits come from ``test_lora_hotswap._trained``.
"""

from __future__ import annotations

from typing import Any

import torch

VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "pissa": {"init_lora_weights": "pissa"}}
"""The kinds of LoRA a hot swap keeps (plain, DoRA, PiSSA with its frozen starting pair)."""
ATTACHED = {"lora_r": 8, "lora_alpha": 16}
"""The attached delta's rank and scale: the checkpoints swapped in have rank 8 or 4."""


def hotswap_ranks(rank: int, world_size: int, engine: str, workdir: str) -> dict[str, Any]:
    """Per variant: the logits of the wrapped model after loading ``<variant>-first`` into its
    attached LoRA, then hot-swapping ``<variant>-second`` and ``<variant>-first`` in, or the error."""
    from deltadist import LoraModel
    from tests.tiny import build_tiny, logits_of, tiny_inputs

    out: dict[str, Any] = {}
    for name, variant in VARIANTS.items():
        model = build_tiny("llama", "lm")
        delta = LoraModel(model, unfrozen_modules=["deltas"], **ATTACHED, **variant)
        delta.freeze_module()
        wrapped = _wrapped(model, delta, engine)
        inputs = tiny_inputs("llama")
        logits: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                delta.load_finetuned(f"{workdir}/{name}-first")
                logits["first"] = logits_of(wrapped, inputs).clone()
                delta.load_finetuned(f"{workdir}/{name}-second", hotswap=True)
                logits["second"] = logits_of(wrapped, inputs).clone()
                delta.load_finetuned(f"{workdir}/{name}-first", hotswap=True)
                logits["back"] = logits_of(wrapped, inputs).clone()
            out[name] = {"logits": logits, "state": {k: v.clone() for k, v in delta.state_dict().items()}}
        except Exception as error:  # reported, so the test names the variant and engine
            out[name] = {"error": f"{type(error).__name__}: {error}"}
    return out


def _wrapped(model: torch.nn.Module, delta: Any, engine: str) -> torch.nn.Module:
    """What the serving loop calls: the engine's usual wrapping of ``model`` (delta attached)."""
    if engine.startswith("zero"):
        from tests.distributed import test_deepspeed

        deepspeed = test_deepspeed._deepspeed()
        wrapped = test_deepspeed.initialize(deepspeed, model, delta, engine)
        wrapped.eval()  # DeepSpeedEngine.eval() returns None
        return wrapped
    from tests.distributed.workers import wrap

    return wrap(model, engine)


def half_steps(rank: int | None, world_size: int, engine: str | None) -> dict[str, Any]:
    """Per variant (DoRA, PiSSA): a bf16 backbone with its fp32 delta (seeded, moved off its no-op
    start), wrapped by ``engine`` (``None``: one process on the whole batch), two SGD steps on this
    rank's share of ``workers.batch()``; the delta's state and how far the steps moved it, or the
    error."""
    import torch.nn.functional as F

    from deltadist import LoraModel, wrap_model
    from tests.distributed.workers import DELTA_SEED, FAMILY, MODEL_SEED, batch
    from tests.tiny import build_tiny

    out: dict[str, Any] = {}
    for name in ("dora", "pissa"):
        model = build_tiny(FAMILY, "cls", seed=MODEL_SEED).to(torch.bfloat16)
        variant = {"init_lora_weights": False, **VARIANTS[name]}  # DoRA: A and B random (seeded)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DELTA_SEED)
            delta = LoraModel(backbone_model=model, lora_r=4, unfrozen_modules=["deltas"], **variant)
        generator = torch.Generator().manual_seed(DELTA_SEED)
        with torch.no_grad():
            for _, param in sorted(delta.delta_parameters().items()):
                if param.requires_grad:
                    param.mul_(1 + 0.1 * torch.randn(param.shape, generator=generator))
        delta.freeze_module()
        start = {k: v.clone() for k, v in delta.state_dict().items()}
        try:
            wrapped = model if engine is None else wrap_model(model, engine, torch.device("cpu"))
            optimizer = torch.optim.SGD(delta.parameters(), lr=0.05)
            inputs, labels = batch(rank, world_size) if engine is not None else batch()
            for _ in range(2):
                optimizer.zero_grad()
                F.cross_entropy(wrapped(**inputs).logits.float(), labels).backward()
                optimizer.step()
            out[name] = {"state": {k: v.clone() for k, v in delta.state_dict().items()},
                         "moved": {k: v - start[k] for k, v in delta.state_dict().items()}}
        except Exception as error:  # reported, so the test names the variant and engine
            out[name] = {"error": f"{type(error).__name__}: {error}"}
    return out
