"""Rank functions for the distributed tests, and the single-process reference they are compared with.

Everything here is importable by spawned children (``tests.distributed.workers``). The recipe:
a tiny seeded Llama classifier, a delta attached to the unwrapped model (seeded, so every rank and
the reference get the same initial delta), ``freeze_module()``, then the engine's usual wrapping,
plain SGD on ``delta.parameters()``, and a mean cross-entropy loss. Each rank trains on its half
of a fixed global batch of 4; the reference trains on the whole batch in one process.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tests.tiny import METHODS

DELTAS = {**METHODS, "dora": {"delta_type": "lora", "lora_r": 4, "use_dora": True, "use_rslora": True},
          "pissa": {"delta_type": "lora", "lora_r": 4, "init_lora_weights": "pissa"}}
"""Every method's config by name, and LoRA's variants: DoRA with rsLoRA scaling (magnitudes read
from the weights at attach, then sharded like any delta parameter) and PiSSA (an SVD of each
site's weight, gathered one site at a time; its frozen starting pair saved with it)."""
CHILD = {"dora": "lora", "pissa": "lora"}
"""The child name of a variant's delta modules (else the method's name)."""

FAMILY = "llama"
MODEL_SEED = 0
DELTA_SEED = 1234
GLOBAL_BATCH = 4
LR = 0.1
LABELS = (0, 1, 2, 1)
ENGINES = ("ddp", "fsdp2", "fsdp1")
METHODS = tuple(DELTAS)
HEAD = "score."
"""The Llama classifier's task head, trained and saved with the delta by default."""


def is_delta_key(key: str, method: str) -> bool:
    """A checkpoint key of ``method``'s delta: its modules, a shared holder, or the task head."""
    child = CHILD.get(method, method)
    return f".{child}." in key or key.startswith((f"{child}_shared.", HEAD))


# -- the recipe, shared by ranks and the reference ---------------------------------------------
def batch(rank: int | None = None, world_size: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The fixed global batch, or ``rank``'s equal share of it."""
    from tests.tiny import tiny_inputs

    inputs = tiny_inputs(FAMILY, batch=GLOBAL_BATCH, seq=8, seed=7)
    labels = torch.tensor(LABELS)
    if rank is None:
        return inputs, labels
    per_rank = GLOBAL_BATCH // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    return {k: v[rows] for k, v in inputs.items()}, labels[rows]


def build(method: str = "lora") -> tuple[nn.Module, Any]:
    """A fresh seeded backbone with a fresh seeded, frozen-around delta (unwrapped).

    Deltas that start as an exact no-op (LoRA's B, adapters' up projection) are moved off it by a
    seeded perturbation, so every parameter gets a gradient from the first step.
    """
    from deltadist import AutoDeltaModel
    from tests.tiny import build_tiny

    model = build_tiny(FAMILY, "cls", seed=MODEL_SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DELTA_SEED)
        delta = AutoDeltaModel.from_config(DELTAS[method], backbone_model=model)
        with torch.no_grad():
            for _, param in sorted(delta.delta_parameters().items()):
                param.add_(torch.randn(param.shape) * 0.05)
    delta.freeze_module()
    return model, delta


def wrap(model: nn.Module, engine: str) -> nn.Module:
    """The engine's usual wrapping of ``model``; returns what the training loop calls."""
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if engine.startswith("fsdp2"):  # "fsdp2", or "fsdp2:hsdp" / "fsdp2:submesh" (see fsdp2_mesh)
        from torch.distributed.fsdp import fully_shard

        mesh = fsdp2_mesh(engine.partition(":")[2])
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if engine.startswith("fsdp1"):  # "fsdp1", "fsdp1:<sharding strategy>" (e.g. fsdp1:no_shard), and
        # "fsdp1:<strategy>:outer": one unit around the whole model, none inside it
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        _, strategy_name, layout = (engine.split(":") + ["", ""])[:3]
        strategy = ShardingStrategy[strategy_name.upper() or "FULL_SHARD"]
        mesh = None
        if strategy == ShardingStrategy.HYBRID_SHARD:  # replicas of 2 ranks, sharded within each
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (dist.get_world_size() // 2, 2))

        layer_cls = type(model.model.layers[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # FSDP1 is deprecated in favour of FSDP2
            # "has both parameters with requires_grad=True and False": expected with deltas.
            warnings.filterwarnings("ignore", message=".*requires_grad=True and False", category=UserWarning)
            return FullyShardedDataParallel(
                model, use_orig_params=True, device_id=torch.device("cpu"),
                auto_wrap_policy=None if layout == "outer" else ModuleWrapPolicy({layer_cls}),
                sharding_strategy=strategy,
                device_mesh=mesh,
            )
    raise ValueError(engine)


def fsdp2_mesh(layout: str) -> Any:
    """The device mesh ``fully_shard`` gets: the world (``""``); HSDP, a 2-D mesh of replicas of
    2 ranks, sharded within each (``"hsdp"``); or one replica's 1-D shard mesh alone (``"submesh"``:
    independent pairs of ranks, each a group smaller than the world)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not layout:
        return init_device_mesh("cpu", (dist.get_world_size(),))
    mesh = init_device_mesh("cpu", (dist.get_world_size() // 2, 2), mesh_dim_names=("replicate", "shard"))
    return {"hsdp": mesh, "submesh": mesh["shard"]}[layout]


def train(model: nn.Module, delta: Any, inputs: dict, labels: torch.Tensor, steps: int) -> list[float]:
    """``steps`` plain SGD steps on ``delta.parameters()``; the losses."""
    optimizer = torch.optim.SGD(list(delta.parameters()), lr=LR)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(**inputs).logits, labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def reference(method: str, steps: int = 3) -> dict[str, Any]:
    """The single-process run on the whole batch: the delta's tensors and the trained logits."""
    model, delta = build(method)
    inputs, labels = batch()
    losses = train(model, delta, inputs, labels, steps)
    with torch.no_grad():
        logits = model(**inputs).logits
    return {"state": delta.state_dict(), "logits": logits, "losses": losses}


def _checkpoint(workdir: str, engine: str, method: str, tag: str) -> str:
    return os.path.join(workdir, f"{engine}-{method}-{tag}")


# -- rank functions -----------------------------------------------------------------------------
def train_and_save(rank: int, world_size: int, engine: str, workdir: str) -> dict[str, Any]:
    """Phase 1: per method, 3 steps then save; and (LoRA) 2 steps then save, to resume from."""
    from deltadist.engines import detect_engine

    inputs, labels = batch(rank, world_size)
    out: dict[str, Any] = {}
    for method, steps in [("lora", 2), *((m, 3) for m in METHODS)]:
        model, delta = build(method)
        wrapped = wrap(model, engine)
        out[f"engine-{method}"] = detect_engine(model).name
        losses = train(wrapped, delta, inputs, labels, steps)
        path = delta.save_finetuned(_checkpoint(workdir, engine, method, str(steps)))
        out[f"{method}-{steps}"] = {"path": path, "losses": losses, "state": delta.state_dict()}
    return out


def resume_and_refuse(rank: int, world_size: int, engine: str, workdir: str) -> dict[str, Any]:
    """Phase 2, in new ranks: resume the 2-step LoRA into a wrapped model with ``load_finetuned``
    for 1 step; ``from_finetuned`` onto the wrapped model refuses (naming ``load_finetuned``) and
    changes nothing; attaching to an already wrapped model is refused and changes nothing."""
    from deltadist import AutoDeltaModel, EngineError, LoraModel
    from tests.tiny import build_tiny

    inputs, labels = batch(rank, world_size)
    out: dict[str, Any] = {"from_finetuned": {}}
    model, delta = build("lora")
    wrapped = wrap(model, engine)
    path = _checkpoint(workdir, engine, "lora", "2")
    for tag, backbone in [("inner", model)] + ([("wrapper", wrapped)] if engine == "ddp" else []):
        before = structure(model)
        try:
            AutoDeltaModel.from_finetuned(path, backbone_model=backbone)
        except Exception as err:  # noqa: BLE001 - the test checks the message
            out["from_finetuned"][tag] = {"error": f"{type(err).__name__}: {err}",
                                          "unchanged": structure(model) == before}
        else:
            out["from_finetuned"][tag] = None
    delta.load_finetuned(path)
    out["resumed"] = {
        "losses": train(wrapped, delta, inputs, labels, 1),
        "path": delta.save_finetuned(_checkpoint(workdir, engine, "lora", "resumed")),
    }

    # Attaching after wrapping: refused, and the model is left as it was.
    model = build_tiny(FAMILY, "cls", seed=MODEL_SEED)
    wrapped = wrap(model, engine)
    target = wrapped if engine == "ddp" else model  # DDP: the wrapper itself is passed as backbone
    before = structure(target)
    try:
        LoraModel(backbone_model=target, lora_r=4)
    except Exception as err:  # noqa: BLE001 - the test checks the type and message
        out["refusal"] = (type(err).__name__, isinstance(err, EngineError), str(err))
    else:
        out["refusal"] = None
    out["unchanged"] = structure(target) == before
    return out


def grad_checkpointing(rank: int, world_size: int) -> dict[str, Any]:
    """One DDP step of LoRA under activation checkpointing, per variant: the error, or every delta
    parameter's gradient. Variants: non-reentrant; reentrant with transformers' input-grad hook
    (``enable_input_require_grads``); reentrant with frozen inputs (hook removed)."""
    from torch.nn.parallel import DistributedDataParallel

    inputs, labels = batch(rank, world_size)
    out: dict[str, Any] = {}
    for variant in ("non_reentrant", "reentrant", "reentrant_frozen_inputs"):
        model, delta = build("lora")
        model.train()  # transformers only checkpoints in training mode
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # 5.x: renamed activation_checkpointing_enable
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": variant != "non_reentrant"}
            )
        if variant == "reentrant":
            model.enable_input_require_grads()  # what transformers 5.x also does by itself
        elif variant == "reentrant_frozen_inputs" and hasattr(model, "_require_grads_hook"):
            model.disable_input_require_grads()  # 4.5x installs no hook by itself: none to remove
        ddp = DistributedDataParallel(model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "None of the inputs have requires_grad"
                F.cross_entropy(ddp(**inputs).logits, labels).backward()
        except Exception as err:  # noqa: BLE001 - reported to the test
            out[variant] = {"error": f"{type(err).__name__}: {err}"}
            continue
        out[variant] = {
            "grads": {k: None if p.grad is None else p.grad.clone() for k, p in delta.named_parameters()},
        }
    return out


def reference_grads() -> dict[str, torch.Tensor]:
    """Single process, whole batch, no checkpointing: the first step's delta gradients."""
    model, delta = build("lora")
    inputs, labels = batch()
    F.cross_entropy(model(**inputs).logits, labels).backward()
    return {k: p.grad.clone() for k, p in delta.named_parameters()}


def structure(model: nn.Module) -> dict[str, Any]:
    """Modules, parameters (local values), flags and hooks: what a refused attach must not change.

    (No ``state_dict()``: FSDP1's state-dict paths are collectives with CPU-unsafe variants.)
    """
    def local(p: torch.Tensor) -> torch.Tensor:
        return p.to_local() if hasattr(p, "to_local") else p

    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": [(n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()],
        "values": [local(p).detach().clone().reshape(-1).tolist() for p in model.parameters()],
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
    }


# -- rank functions for the harness's own tests ------------------------------------------------
def report_setup(rank: int, world_size: int) -> dict[str, Any]:
    """What a rank sees: its group, its threads, the delta engine detected, a collective's result."""
    from deltadist.engines import detect_engine

    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    return {
        "rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": dist.get_backend(),
        "omp": os.environ.get("OMP_NUM_THREADS"), "threads": torch.get_num_threads(),
        "engine": detect_engine(nn.Linear(1, 1)).name, "sum": total.item(), "args_seen": world_size,
    }


def raise_on_rank_one(rank: int, world_size: int) -> None:
    """Rank 1 fails; rank 0 waits for it in a collective that never completes."""
    if rank == 1:
        _fail_deep_inside()
    dist.barrier()


def _fail_deep_inside() -> None:
    raise ValueError("boom on rank 1")


def hang_on_rank_one(rank: int, world_size: int) -> None:
    """Rank 1 never returns; rank 0 waits for it in a barrier."""
    if rank == 1:
        import time

        while True:
            time.sleep(0.1)
    dist.barrier()


def crash_on_rank_one(rank: int, world_size: int) -> None:
    """Rank 1 dies in native code (a segfault); rank 0 waits for it in a barrier."""
    if rank == 1:
        import faulthandler

        faulthandler._sigsegv()
    dist.barrier()


# -- merges, failed writes and half precision under each engine ---------------------------------
MERGE_SITES = ["q_proj", "score"]
"""A site inside every layer and one at the model root (the task head)."""


def merge_sites_model(model: nn.Module | None = None, dora: bool = False) -> tuple[nn.Module, Any]:
    """The backbone (or ``model``, holding its weights) with a LoRA (``dora``: a DoRA) on
    :data:`MERGE_SITES`, moved (seeded) away from its no-op start."""
    from deltadist import LoraModel
    from tests.tiny import build_tiny

    model = build_tiny(FAMILY, "cls", seed=MODEL_SEED) if model is None else model
    delta = LoraModel(backbone_model=model, lora_r=4, modified_modules=MERGE_SITES,
                      unfrozen_modules=["deltas"], use_dora=dora)
    generator = torch.Generator().manual_seed(DELTA_SEED)
    with torch.no_grad():
        for _, param in sorted(delta.delta_parameters().items()):
            moved = torch.randn(param.shape, generator=generator) * 0.2
            param.copy_(param * (1 + moved) if param.dim() == 1 else moved)  # a magnitude near its norms
    delta.freeze_module()
    return model, delta


def merge_roundtrip(rank: int, world_size: int, engine: str, dora: bool = False) -> dict[str, Any]:
    """Attached, merged, unmerged and merged-and-unloaded logits of the wrapped model."""
    model, delta = merge_sites_model(dora=dora)
    wrapped = wrap(model, engine)
    inputs, _ = batch()

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return wrapped(**inputs).logits.detach().clone()

    out = {"attached": logits()}  # a forward first: FSDP2 then leaves the root unsharded
    delta.merge()
    out["merged"] = logits()
    delta.unmerge()
    out["unmerged"] = logits()
    delta.merge_and_unload()
    out["unloaded"] = logits()
    out["delta_modules"] = [n for n, _ in model.named_modules() if n.endswith(".lora")]
    return out


def failing_save(rank: int, world_size: int, workdir: str) -> dict[str, Any]:
    """Rank 0's write fails (disk full): every rank must raise, none may wait forever."""
    import deltadist.io.checkpoint as checkpoint

    model, delta = build("lora")
    wrapped = wrap(model, "ddp")
    if rank == 0:
        def disk_full(*args: Any, **kwargs: Any) -> None:
            raise OSError(28, "No space left on device")

        checkpoint.save_file = disk_full
    try:
        delta.save_finetuned(os.path.join(workdir, "full"))
    except Exception as err:  # noqa: BLE001 - reported to the test
        outcome = f"{type(err).__name__}: {err}"
    else:
        outcome = None
    del wrapped
    return {"error": outcome}


def half_precision_step(rank: int, world_size: int, engine: str) -> dict[str, Any]:
    """A bf16 backbone with its (fp32 by default) LoRA: wrap, two AdamW steps, report."""
    from deltadist import LoraModel, wrap_model
    from tests.tiny import build_tiny

    model = build_tiny(FAMILY, "cls", seed=MODEL_SEED).to(torch.bfloat16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DELTA_SEED)
        delta = LoraModel(backbone_model=model, lora_r=4, unfrozen_modules=["deltas"])
    delta.freeze_module()
    try:
        wrapped = wrap_model(model, engine, torch.device("cpu"))
        optimizer = torch.optim.AdamW(delta.parameters(), lr=1e-2)
        inputs, labels = batch(rank, world_size)
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(wrapped(**inputs).logits.float(), labels).backward()
            optimizer.step()
    except Exception as err:  # noqa: BLE001 - reported to the test
        return {"error": f"{type(err).__name__}: {err}"}
    state = delta.state_dict()
    return {"error": None, "dtypes": sorted({str(v.dtype) for v in state.values()}),
            "finite": all(bool(torch.isfinite(v).all()) for v in state.values()),
            "moved": any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("lora_B"))}


def fsdp1_state_dict_keys(rank: int, world_size: int) -> dict[str, Any]:
    """``state_dict()`` of an FSDP1-wrapped backbone after ``freeze_module()``: its keys."""
    from tests.tiny import build_tiny

    model, delta = build("lora")
    wrapped = wrap(model, "fsdp1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        keys = sorted(wrapped.state_dict())
    return {"keys": keys, "delta": sorted(dict(delta.named_parameters())),
            "backbone": full_state_names(build_tiny(FAMILY, "cls", seed=MODEL_SEED))}


def full_state_names(model: nn.Module) -> list[str]:
    """The keys of ``model``'s whole state dict."""
    return sorted(model.state_dict())


def train_save_merge(rank: int, world_size: int, engine: str, workdir: str,
                     weights: str | None = None) -> dict[str, Any]:
    """LoRA and Compacter (a shared rule at the root): 3 steps, save, then merge LoRA in place.

    With ``weights`` (the backbone as saved by the test), LoRA's run also reports: the logits after
    every backbone shard was wiped and refilled by the engine's row-wise ``load`` (vs. the unwrapped
    model's), the backbone fingerprint this rank samples, and which backbone parameters the merge
    changed on this rank.
    """
    inputs, labels = data_share(engine, rank, world_size)
    out: dict[str, Any] = {}
    for method in ("lora", "compacter"):
        model, delta = build(method)
        checks = weights is not None and method == "lora"
        if checks:
            with torch.no_grad():
                unwrapped = model(**batch()[0]).logits
        wrapped = wrap(model, engine)
        if checks:
            reloaded = _reloaded_logits(model, wrapped, delta, weights)
            out["load_error"] = float((reloaded - unwrapped).abs().max())
        train(wrapped, delta, inputs, labels, steps=3)
        path = _checkpoint(workdir, engine.replace(":", "_"), method, "trained")
        delta.save_finetuned(path)
        out[method] = {"path": path, "engine": delta.engine.name}
        if checks:
            out["fingerprint"] = fingerprint(model, delta)
        if method == "lora":
            with torch.no_grad():
                unmerged = wrapped(**inputs).logits
                before = _local_backbone(model, delta) if checks else {}
                delta.merge()
                after = _local_backbone(model, delta) if checks else {}
                out["merge_error"] = float((wrapped(**inputs).logits - unmerged).abs().max())
            if checks:  # the backbone parameters whose piece on this rank the merge changed
                out["merge_moved"] = sorted(n for n, v in before.items() if not torch.equal(after[n], v))
    return out


def data_share(engine: str, rank: int, world_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """This rank's share of the batch. Under ``fsdp2:submesh`` each pair of ranks trains on its
    own (no gradient crosses pairs), so each pair splits the whole batch, as 2 ranks would."""
    if engine == "fsdp2:submesh":
        return batch(rank % 2, 2)
    return batch(rank, world_size)


def fingerprint(model: nn.Module, delta: Any) -> dict[str, Any]:
    """The backbone fingerprint a delta saves (task head left out: the delta carries it)."""
    from deltadist.core.fingerprint import backbone_fingerprint

    found = backbone_fingerprint(model, delta.engine, delta.record.kept_backbone)
    return {"digest": found.digest, "names": found.names, "samples": found.samples}


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def _local_backbone(model: nn.Module, delta: Any) -> dict[str, torch.Tensor]:
    """Copies of this rank's pieces of the backbone's own parameters, by name."""
    delta.engine.settle(model)  # sharded again after a forward
    ids = {id(p) for p in delta.parameters()}  # the delta's own, its task-head copy included
    return {n: _local(p).detach().clone() for n, p in model.named_parameters() if id(p) not in ids}


def _reloaded_logits(model: nn.Module, wrapped: nn.Module, delta: Any, weights: str) -> torch.Tensor:
    """Logits of the whole batch after every backbone shard is zeroed and loaded from ``weights``
    by the engine (each rank reads only its rows), as ``prepare_model`` loads them."""
    from deltadist.io.backbone_weights import load_weights

    ids = {id(p) for p in delta.parameters()}  # the delta's own, its task-head copy included
    with torch.no_grad():
        for param in model.parameters():
            if id(param) not in ids:
                _local(param).zero_()
    load_weights(model, weights, "")
    with torch.no_grad():
        return wrapped(**batch()[0]).logits


def flat_parameters_refused(rank: int, world_size: int) -> str:
    """FSDP1 with use_orig_params=False (wrapped before freezing: it refuses mixed flags): the
    delta's own calls say what to do, instead of saving an empty checkpoint."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from deltadist import LoraModel
    from deltadist.errors import EngineError
    from tests.tiny import build_tiny

    model = build_tiny(FAMILY, "cls", seed=MODEL_SEED)
    delta = LoraModel(model, lora_r=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        FullyShardedDataParallel(model, use_orig_params=False, device_id=torch.device("cpu"))
    try:
        delta.save_finetuned(f"/nonexistent/rank{rank}")
    except EngineError as err:
        return str(err)
    return "saved"


# -- multitask: two LoRA deltas, each row of the batch through one of them ----------------------
MIXED_ROWS = (0, 1, 1, 0)
"""Which of the two deltas serves each row of the global batch (each rank's share has both)."""


def two_task_model() -> tuple[nn.Module, list[Any]]:
    """A seeded backbone with two seeded LoRA deltas on the same sites, frozen around them."""
    from deltadist import AutoDeltaModel
    from tests.tiny import build_tiny

    model = build_tiny(FAMILY, "cls", seed=MODEL_SEED)
    deltas = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DELTA_SEED)
        for _ in range(2):
            delta = AutoDeltaModel.from_config({**DELTAS["lora"], "unfrozen_modules": ["deltas"]},
                                               backbone_model=model)
            with torch.no_grad():
                for _, param in sorted(delta.delta_parameters().items()):
                    param.add_(torch.randn(param.shape) * 0.05)
            deltas.append(delta)
    for delta in deltas:
        delta.freeze_module()
    return model, deltas


def train_mixed(runner: nn.Module, deltas: list[Any], rows: tuple[int, ...], inputs: dict,
                labels: torch.Tensor, steps: int = 3) -> dict[str, dict[str, torch.Tensor]]:
    """``steps`` SGD steps of both deltas at once on one mixed batch; each delta's tensors."""
    import deltadist

    optimizer = torch.optim.SGD([p for d in deltas for p in d.parameters()], lr=LR)
    for _ in range(steps):
        optimizer.zero_grad()
        with deltadist.mixed_batch([deltas[i] for i in rows]):
            loss = F.cross_entropy(runner(**inputs).logits, labels)
        loss.backward()  # outside the block: the routing was recorded by the forward
        optimizer.step()
    return {str(i): delta.state_dict() for i, delta in enumerate(deltas)}


def mixed_reference() -> dict[str, dict[str, torch.Tensor]]:
    model, deltas = two_task_model()
    inputs, labels = batch()
    return train_mixed(model, deltas, MIXED_ROWS, inputs, labels)


def mixed_ranks(rank: int, world_size: int, engine: str) -> dict[str, dict[str, torch.Tensor]]:
    model, deltas = two_task_model()
    runner = wrap(model, engine)
    inputs, labels = batch(rank, world_size)
    per_rank = GLOBAL_BATCH // world_size
    return train_mixed(runner, deltas, MIXED_ROWS[rank * per_rank:(rank + 1) * per_rank], inputs, labels)
