"""Rank functions for the mixture-of-experts tests (``test_moe.py``) and the single-process
reference they are compared with.

The recipe: a tiny seeded Mixtral (or Qwen3-MoE) causal LM, LoRA on the fused expert parameters
(``mlp.experts.gate_up_proj`` / ``down_proj``: ``[experts, out, in]``, one pair per expert) and on
``q_proj``, started away from its no-op (``init_lora_weights=False``, seeded, so every rank and
the reference get the same delta), ``freeze_module()``, the engine's wrapping, plain SGD on the
delta, a mean next-token cross-entropy. Each rank trains on its half of a fixed batch of 4; the
reference trains on the whole batch in one process.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tests.distributed import workers

MODEL_SEED = 0
DELTA_SEED = 1234
GLOBAL_BATCH = 4
LR = 0.5
STEPS = 3
TARGETS = ["experts", "q_proj"]
"""LoRA on every layer's fused experts (both their 3-D parameters) and attention's q_proj."""


def batch(family: str, rank: int | None = None, world_size: int = 1) -> dict[str, torch.Tensor]:
    """The fixed global batch (``labels`` = the inputs: the model shifts them), or ``rank``'s half."""
    from tests.tiny import tiny_inputs

    inputs = tiny_inputs(family, batch=GLOBAL_BATCH, seq=8, seed=7)
    if rank is None:
        return inputs
    per_rank = GLOBAL_BATCH // world_size
    return {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in inputs.items()}


def build(family: str, before_attach: Any = None) -> tuple[nn.Module, Any]:
    """A fresh seeded backbone with a fresh seeded LoRA (experts and q_proj), frozen around it
    (``before_attach(model)`` first, if given)."""
    from deltadist import LoraModel
    from tests.tiny import build_tiny

    model = build_tiny(family, "lm", seed=MODEL_SEED)
    if before_attach is not None:
        before_attach(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DELTA_SEED)
        delta = LoraModel(model, modified_modules=TARGETS, lora_r=4, lora_alpha=8, init_lora_weights=False)
    delta.freeze_module()
    return model, delta


def loss_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy (every row has the same length: the mean of the ranks' means
    is the whole batch's)."""
    logits = model(**inputs).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs["input_ids"][:, 1:].reshape(-1))


def train(model: nn.Module, delta: Any, inputs: dict, steps: int = STEPS) -> list[float]:
    optimizer = torch.optim.SGD(list(delta.parameters()), lr=LR)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_of(model, inputs)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits.detach().clone()


def experts_inputs() -> tuple[torch.Tensor, ...]:
    """Hidden states [tokens, 64], the 2 experts each token is routed to, and their weights."""
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(6, 64, generator=generator)
    routed = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    return hidden, routed, torch.rand(6, 2, generator=generator)


def reference(family: str) -> dict[str, Any]:
    """One process, the whole batch: the starting and trained delta, the trained logits, the
    backbone's expert weight with the trained update merged (``W + s B A``), by hand, and layer
    0's experts module called by itself on :func:`experts_inputs`."""
    model, delta = build(family)
    start = {k: v.clone() for k, v in delta.state_dict().items()}
    inputs = batch(family)
    losses = train(model, delta, inputs)
    experts = model.model.layers[0].mlp.experts
    branch = next(att.delta for att in delta.record.attachments
                  if att.site_name == "model.layers.0.mlp.experts.gate_up_proj")
    with torch.no_grad():
        merged = experts.gate_up_proj + branch.delta_weight()
        direct = experts(*experts_inputs())
    return {"start": start, "state": delta.state_dict(), "logits": logits(model, inputs), "losses": losses,
            "merged_gate_up_0": merged.clone(), "experts_call": direct,
            "base_logits": logits(build(family)[0], inputs)}


# -- rank functions -----------------------------------------------------------------------------
def _full(wrapped: nn.Module, param: torch.Tensor) -> torch.Tensor:
    """``param`` whole: a DTensor's full tensor (FSDP2); under FSDP1 inside ``summon_full_params``."""
    if hasattr(param, "full_tensor"):
        return param.full_tensor()
    if type(wrapped).__name__ == "FullyShardedDataParallel":
        with type(wrapped).summon_full_params(wrapped):
            return param.detach().clone()
    return param.detach().clone()


def torch_engine(rank: int, world_size: int, engine: str, family: str, workdir: str) -> dict[str, Any]:
    """DDP / FSDP2 / FSDP1: train on this rank's half, save; then merge the trained delta into the
    (sharded) backbone and unmerge, merge and unload; the logits after each, on the whole batch."""
    from deltadist.engines import detect_engine

    model, delta = build(family)
    wrapped = workers.wrap(model, engine)
    experts = model.model.layers[0].mlp.experts
    out: dict[str, Any] = {"engine": detect_engine(model).name, "sharded": [
        type(p).__name__ == "DTensor" and p.to_local().shape != p.shape
        for p in (experts.gate_up_proj, experts.lora.lora_A, experts.lora.lora_B)],
        "local_numel": [p.numel() for p in (experts.gate_up_proj, experts.down_proj)]}
    out["losses"] = train(wrapped, delta, batch(family, rank, world_size))
    out["path"] = delta.save_finetuned(os.path.join(workdir, f"{engine}-{family}"))
    out["state"] = delta.state_dict()
    inputs = batch(family)
    out["logits"] = logits(wrapped, inputs)
    delta.merge()
    out["merged"] = logits(wrapped, inputs)
    out["merged_gate_up_0"] = _full(wrapped, experts.gate_up_proj)
    delta.unmerge()
    out["unmerged"] = logits(wrapped, inputs)
    delta.merge_and_unload()
    out["unloaded"] = logits(wrapped, inputs)
    out["delta_modules"] = [n for n, _ in model.named_modules() if n.rpartition(".")[2].startswith("lora")]
    return out


def _record_fetched(experts: nn.Module, seen: list[bool]) -> None:
    """A pre-hook registered before the LoRA's, so it runs just before the offset's: whether the
    expert weight is whole (fetched by DeepSpeed) when the offset reads it."""
    def record(module: nn.Module, args: tuple) -> None:
        seen.append(module.gate_up_proj.numel() == module.gate_up_proj.ds_numel)
    experts.register_forward_pre_hook(record)


def _train_through_experts(experts: nn.Module) -> str:
    """The experts module called by itself with gradients, and a backward: ``"ok"``, or the error."""
    from deltadist import DeltaError

    try:
        experts(*experts_inputs()).pow(2).sum().backward()
    except DeltaError as error:
        return str(error)
    return "ok" if experts.lora.lora_A.grad is not None else "no gradient"


def zero3(rank: int, world_size: int, family: str, workdir: str, leaf: bool) -> dict[str, Any]:
    """DeepSpeed ZeRO-3 (every parameter partitioned, persistence threshold 0): train on this
    rank's half, save; merge / unmerge / merge-and-unload into the partitions. ``leaf``:
    DeepSpeed's default, the sparse-MoE block is a ZeRO leaf, fetched whole at its pre-forward
    (no hooks inside it); else (``leaf_module.classes: []``) the experts module gets DeepSpeed's
    hooks, registered after the offset's, so the offset must gather the weight itself."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from deltadist.engines import detect_engine

    deepspeed.init_distributed(dist_backend="gloo")
    seen: list[bool] = []
    model, delta = build(family, before_attach=lambda m: _record_fetched(m.model.layers[0].mlp.experts, seen))
    optimizer = torch.optim.SGD(list(delta.parameters()), lr=LR)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0,
            **({} if leaf else {"leaf_module": {"classes": []}})}
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world_size, "gradient_accumulation_steps": 1,
              "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
              "zero_optimization": zero}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    experts = model.model.layers[0].mlp.experts
    out: dict[str, Any] = {"engine": detect_engine(model).name,
                           "partitioned": experts.gate_up_proj.numel() < experts.gate_up_proj.ds_numel}
    inputs, losses = batch(family, rank, world_size), []
    for _ in range(STEPS):
        engine.train()
        loss = loss_of(engine, inputs)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    out["losses"] = losses
    out["path"] = delta.save_finetuned(os.path.join(workdir, f"zero3-{family}"))
    out["state"] = delta.state_dict()
    engine.eval()
    # The experts module called by itself: nothing fetched its weight before the offset's pre-hook
    # (without the leaf, DeepSpeed's own hook on it runs after ours), so the offset gathers it.
    with torch.no_grad():
        calls = len(seen)
        out["experts_call"] = experts(*experts_inputs()).detach().clone()
        out["experts_call_fetched"], out["fetched_at_offset"] = seen[calls:], seen[:calls]
    out["experts_grad_call"] = _train_through_experts(experts)
    whole = batch(family)
    out["logits"] = logits(engine, whole)
    delta.merge()
    out["merged"] = logits(engine, whole)
    with deepspeed.zero.GatheredParameters([experts.gate_up_proj]):
        out["merged_gate_up_0"] = experts.gate_up_proj.detach().clone()
    delta.unmerge()
    out["unmerged"] = logits(engine, whole)
    delta.merge_and_unload()
    out["unloaded"] = logits(engine, whole)
    out["delta_modules"] = [n for n, _ in model.named_modules() if n.rpartition(".")[2].startswith("lora")]
    dist.barrier()
    return out
