"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 gloo ranks (CPU) give what one process gives.

Launches (module-scoped fixtures), each ~10-20 s of work after ~15 s of imports:

1. ``train_ranks``: per variant -- ZeRO-2, ZeRO-3 partitioning a normally built backbone at
   ``deepspeed.initialize``, ZeRO-3 with a backbone partitioned at construction (transformers'
   ``HfDeepSpeedConfig``, base weights loaded with ``GatheredParameters(modifier_rank=0)``) -- LoRA,
   ``freeze_module()``, 3 steps of SGD with momentum (each rank takes its half of a fixed global
   batch of 4, mean loss), ``save_finetuned`` on every rank. ZeRO-3 also writes an engine
   checkpoint after step 2; the partitioned-at-construction run checks ``merge()`` / ``unmerge()``.
2. ``resume_ranks``: new ranks build, attach, freeze, initialize, ``engine.load_checkpoint`` (strict)
   and take the third step; ``from_finetuned`` onto the engine, and onto its inner model, refuses
   (naming ``load_finetuned``), and ``delta.load_finetuned`` loads into the attached LoRA.
3. ``trainer_ranks``: :class:`deltadist.trainer.DeltaTrainer` with each shipped
   ``configs/deepspeed/*.json`` writes delta-only checkpoints (and an engine checkpoint without the
   frozen backbone); under ZeRO-3 resuming from the first checkpoint continues exactly.
4. ``sub_groups`` (slow grid, 4 ranks): groups smaller than the world -- ZeRO++ hierarchical
   partitioning trains, saves, fingerprints and merges as one process; a backbone partitioned over
   pairs of ranks fingerprints and merges as one process; attaching to the inner model of a
   ZeRO-1/2 engine is refused.

The single-process reference (whole batch) runs in the pytest process. The rank functions live here
and are handed to the harness as ``tests.distributed.test_deepspeed.<name>`` (see
:func:`_importable`), so the spawned ranks can import them.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from tests.distributed import workers
from tests.distributed.harness import REPO_ROOT, run_ranks
from tests.tiny import build_tiny

pytestmark = pytest.mark.distributed

TOL = {"rtol": 1e-5, "atol": 1e-6}
STEPS = 3
MOMENTUM = 0.9
"""SGD momentum: gives the optimizer a state, so resuming from an engine checkpoint must restore it."""
LORA_R = 4
VARIANTS = ("zero2", "zero3", "zero3_init")
OTHER_METHODS = tuple(m for m in workers.METHODS if m != "lora")
"""LoRA has its own, longer recipe here (engine checkpoints, merges, the Trainer)."""
"""ZeRO-2; ZeRO-3 partitioning at ``deepspeed.initialize``; ZeRO-3 partitioned at construction."""
FULL_MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json")
LAUNCH_TIMEOUT = 300


def ds_config(stage: int, world_size: int = 2, **zero_options: Any) -> dict[str, Any]:
    """A DeepSpeed config for a torch optimizer passed to ``deepspeed.initialize``.

    ``stage3_param_persistence_threshold: 0`` keeps even the tiny model's parameters partitioned
    outside forward/backward (by default ZeRO-3 keeps parameters under 1e5 values whole).
    ``zero_options`` join the ``zero_optimization`` section.
    """
    zero: dict[str, Any] = {"stage": stage, **zero_options}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_micro_batch_size_per_gpu": workers.GLOBAL_BATCH // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 unless told; the reference does not
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


# -- the recipe ---------------------------------------------------------------------------------
def _deepspeed() -> Any:
    """``deepspeed`` on the CPU accelerator, joined to the harness's gloo process group."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def _base_model() -> nn.Module:
    return build_tiny(workers.FAMILY, "cls", seed=workers.MODEL_SEED)


def _partitioned_at_construction(deepspeed: Any) -> nn.Module:
    """The tiny model built already partitioned (``HfDeepSpeedConfig``), with the base weights loaded."""
    from transformers import AutoModelForSequenceClassification
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    base = _base_model()
    keep = HfDeepSpeedConfig(ds_config(3))  # transformers holds a weak reference: keep it alive
    try:
        model = AutoModelForSequenceClassification.from_config(base.config, dtype=torch.float32)
    finally:
        unset_hf_deepspeed_config()
        del keep
    assert all(p.numel() == 0 and hasattr(p, "ds_shape") for p in model.parameters())
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        if torch.distributed.get_rank() == 0:
            model.load_state_dict(base.state_dict())
    return model.eval()


def build(deepspeed: Any, variant: str, method: str = "lora") -> tuple[nn.Module, Any]:
    """Backbone, seeded delta (the same on every rank and in the reference), frozen around it.

    LoRA starts at its no-op; the other methods start as ``workers.build`` moves them (on every
    rank alike), which under ZeRO-3 is a gather-modify-scatter of the delta only.
    """
    from deltadist import AutoDeltaModel, LoraModel

    model = _partitioned_at_construction(deepspeed) if variant == "zero3_init" else _base_model()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(workers.DELTA_SEED)
        if method == "lora":
            delta = LoraModel(backbone_model=model, lora_r=LORA_R)
        else:
            delta = AutoDeltaModel.from_config(workers.DELTAS[method], backbone_model=model)
            delta.load_state_dict(_moved_start(method))
    delta.freeze_module()
    return model, delta


def initialize(deepspeed: Any, model: nn.Module, delta: Any, variant: str, world_size: int = 2,
               **zero_options: Any) -> Any:
    """``deepspeed.initialize`` at the variant's stage (``zero1``, ``zero2``, else 3)."""
    optimizer = torch.optim.SGD(list(delta.parameters()), lr=workers.LR, momentum=MOMENTUM)
    stage = {"zero1": 1, "zero2": 2}.get(variant, 3)
    config = ds_config(stage, world_size, **zero_options)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def step(engine: Any, inputs: dict, labels: torch.Tensor) -> float:
    engine.train()
    loss = F.cross_entropy(engine(**inputs).logits, labels)
    engine.backward(loss)
    engine.step()
    return loss.item()


@torch.no_grad()
def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    """Eval logits (under ZeRO-3 every rank must run the same forwards)."""
    model.eval()
    return model(**inputs).logits.detach().clone()


def _moved_start(method: str) -> dict[str, torch.Tensor]:
    """The starting values ``workers.build`` gives ``method``'s delta (computed in one process)."""
    _, delta = workers.build(method)
    return delta.state_dict()


def reference(steps: int = STEPS, method: str = "lora") -> dict[str, Any]:
    """One process, the whole batch, plain PyTorch: the delta's tensors and the trained logits."""
    from deltadist import LoraModel

    if method == "lora":
        model = _base_model()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(workers.DELTA_SEED)
            delta = LoraModel(backbone_model=model, lora_r=LORA_R)
        delta.freeze_module()
    else:
        model, delta = workers.build(method)
    inputs, labels = workers.batch()
    optimizer = torch.optim.SGD(list(delta.parameters()), lr=workers.LR, momentum=MOMENTUM)
    for _ in range(steps):
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(**inputs).logits, labels).backward()
        optimizer.step()
    return {"state": delta.state_dict(), "logits": logits(model, inputs)}


def _lora_children(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules()
                   if n.rsplit(".", 1)[-1].startswith("lora")})


# -- rank functions -----------------------------------------------------------------------------
def train_ranks(rank: int, world_size: int, workdir: str) -> dict[str, Any]:
    """Launch 1: each variant trains 3 steps and saves; ZeRO-3 also writes an engine checkpoint
    after step 2; the partitioned-at-construction run checks merge/unmerge."""
    from deltadist.engines import detect_engine

    deepspeed = _deepspeed()
    inputs, labels = workers.batch(rank, world_size)
    full_inputs, _ = workers.batch()
    out: dict[str, Any] = {}
    for variant in VARIANTS:
        model, delta = build(deepspeed, variant)
        engine = initialize(deepspeed, model, delta, variant)
        run: dict[str, Any] = {"losses": []}
        for i in range(STEPS):
            run["losses"].append(step(engine, inputs, labels))
            if variant == "zero3" and i == STEPS - 2:
                # Without exclude_frozen_parameters ZeRO-2/3 also write every rank's piece of the
                # frozen backbone ("frozen_param_fragments").
                engine.save_checkpoint(os.path.join(workdir, "engine"), exclude_frozen_parameters=True)
        run["engine"] = detect_engine(model).name
        # Under ZeRO-3 every delta parameter is a partition here: saving must gather.
        run["delta_partitioned"] = all(p.numel() == 0 and hasattr(p, "ds_shape") for p in delta.parameters())
        run["path"] = delta.save_finetuned(os.path.join(workdir, variant))
        run["state"] = delta.state_dict()
        run["logits"] = logits(engine, full_inputs)
        if variant == "zero3_init":
            delta.merge()
            run["merged_children"] = _lora_children(model)
            run["merged_logits"] = logits(engine, full_inputs)
            delta.unmerge()
            run["unmerged_children"] = _lora_children(model)
            run["unmerged_logits"] = logits(engine, full_inputs)
        out[variant] = run
    # A LoRA on a site at the model root (the task head) and in every layer merges into the
    # ZeRO-3 partitions too.
    for kind in ("lora", "dora"):
        model, delta = workers.merge_sites_model(dora=kind == "dora")
        engine = initialize(deepspeed, model, delta, "zero3")
        merges = {"attached": logits(engine, full_inputs)}
        delta.merge()
        merges["merged"] = logits(engine, full_inputs)
        delta.unmerge()
        merges["unmerged"] = logits(engine, full_inputs)
        delta.merge_and_unload()
        merges["unloaded"] = logits(engine, full_inputs)
        out[f"root_merge-{kind}"] = merges
    return out


def method_ranks(rank: int, world_size: int, workdir: str) -> dict[str, Any]:
    """Every other method under each variant: 3 steps, save, the delta's state."""
    deepspeed = _deepspeed()
    inputs, labels = workers.batch(rank, world_size)
    out: dict[str, Any] = {}
    for method in OTHER_METHODS:
        for variant in VARIANTS:
            model, delta = build(deepspeed, variant, method)
            engine = initialize(deepspeed, model, delta, variant)
            losses = [step(engine, inputs, labels) for _ in range(STEPS)]
            path = delta.save_finetuned(os.path.join(workdir, f"{variant}-{method}"))
            out[f"{variant}-{method}"] = {"path": path, "losses": losses, "state": delta.state_dict()}
    return out


def resume_ranks(rank: int, world_size: int, workdir: str) -> dict[str, Any]:
    """Launch 2, new ranks: resume the ZeRO-3 engine checkpoint of step 2 for one more step; then
    ``from_finetuned`` of the 3-step delta onto the engine refuses and ``load_finetuned`` loads it."""
    from deltadist import AutoDeltaModel

    deepspeed = _deepspeed()
    inputs, labels = workers.batch(rank, world_size)
    full_inputs, _ = workers.batch()
    model, delta = build(deepspeed, "zero3")
    engine = initialize(deepspeed, model, delta, "zero3")
    load_path, _ = engine.load_checkpoint(os.path.join(workdir, "engine"))  # load_module_strict=True
    out: dict[str, Any] = {"load_path": load_path, "global_steps": engine.global_steps}
    out["losses"] = [step(engine, inputs, labels)]
    out["path"] = delta.save_finetuned(os.path.join(workdir, "resumed"))

    # from_finetuned never loads into the attached LoRA: onto the engine or its inner model (what
    # a user holds as trainer.model) it refuses, naming load_finetuned, and changes nothing.
    out["from_finetuned"] = {}
    for tag, backbone in (("engine", engine), ("inner", model)):
        try:
            AutoDeltaModel.from_finetuned(os.path.join(workdir, "zero3"), backbone_model=backbone)
            out["from_finetuned"][tag] = None
        except Exception as err:  # noqa: BLE001 - reported to the test
            out["from_finetuned"][tag] = {"error": f"{type(err).__name__}: {err}",
                                          "children": _lora_children(model)}
    delta.load_finetuned(os.path.join(workdir, "zero3"))
    out["logits"] = logits(engine, full_inputs)

    # A new delta on the inner model after initialize: ZeRO-3 would never partition or train it.
    from deltadist import EngineError, LoraModel

    try:
        LoraModel(backbone_model=model, lora_r=LORA_R, modified_modules=["o_proj"])
        error = None
    except Exception as err:  # noqa: BLE001 - reported to the test
        error = err
    out["attach_inner"] = {"error": None if error is None else f"{type(error).__name__}: {error}",
                           "is_engine_error": isinstance(error, EngineError),
                           "children": _lora_children(model)}
    return out


HPZ_PARTITION_SIZE = 2
"""ZeRO++ hierarchical partitioning (hpZ): a secondary copy of each partition over groups of 2."""


def _attach_to_inner(deepspeed: Any, variant: str, world_size: int) -> dict[str, Any]:
    """Attach LoRA to the inner model of an engine ``deepspeed.initialize`` built (ZeRO-1/2):
    the error it raised, and whether the model was left as it was."""
    from deltadist import EngineError, LoraModel

    model, delta = build(deepspeed, variant)
    initialize(deepspeed, model, delta, variant, world_size)
    before = workers.structure(model)
    try:
        LoraModel(backbone_model=model, lora_r=LORA_R, modified_modules=["o_proj"])
        error = None
    except Exception as err:  # noqa: BLE001 - reported to the test
        error = err
    return {"error": None if error is None else f"{type(error).__name__}: {error}",
            "is_engine_error": isinstance(error, EngineError),
            "unchanged": workers.structure(model) == before}


def inner_refusal_ranks(rank: int, world_size: int) -> dict[str, Any]:
    """:func:`_attach_to_inner` for ZeRO-1 and ZeRO-2 in this world."""
    deepspeed = _deepspeed()
    return {f"attach_{v}": _attach_to_inner(deepspeed, v, world_size) for v in ("zero1", "zero2")}


def sub_group_ranks(rank: int, world_size: int, workdir: str) -> dict[str, Any]:
    """World of 4, groups smaller than the world. ``attach_zero1/2``: a delta attached to the inner
    model after ``deepspeed.initialize`` under ZeRO-1/2 (its optimizer would never see it);
    ``pairs``: a backbone partitioned over pairs of ranks (``zero.Init(data_parallel_group=...)``),
    fingerprinted and merged into; ``hpz``: ZeRO-3 with ``zero_hpz_partition_size`` trains LoRA
    3 steps on one example per rank, saves, and merges."""
    from deltadist.engines import detect_engine

    deepspeed = _deepspeed()
    out = inner_refusal_ranks(rank, world_size)

    # Interleaved pairs ({0, 2}, {1, 3}): a rank's place in its group is not its place in the world.
    pairs = [torch.distributed.new_group(list(range(first, world_size, 2))) for first in (0, 1)]
    out["pairs"] = _partitioned_over(deepspeed, pairs[rank % 2], world_size)

    inputs, labels = workers.batch(rank, world_size)
    full_inputs, _ = workers.batch()
    model, delta = build(deepspeed, "zero3")
    engine = initialize(deepspeed, model, delta, "zero3", world_size,
                        zero_hpz_partition_size=HPZ_PARTITION_SIZE)
    run: dict[str, Any] = {"losses": [step(engine, inputs, labels) for _ in range(STEPS)]}
    run["engine"] = detect_engine(model).name
    # hpZ in effect: the frozen backbone's partitions also have their secondary copy over the
    # smaller group (DeepSpeed drops that copy of the parameters a step has just updated).
    run["frozen_without_secondary"] = sorted(
        n for n, p in model.named_parameters() if not p.requires_grad and p.ds_secondary_tensor is None)
    run["path"] = delta.save_finetuned(os.path.join(workdir, "hpz"))
    run["state"] = delta.state_dict()
    run["fingerprint"] = workers.fingerprint(model, delta)
    run["logits"] = logits(engine, full_inputs)
    delta.merge()
    run["merged_children"] = _lora_children(model)
    run["merged_logits"] = logits(engine, full_inputs)
    delta.unmerge()
    run["unmerged_logits"] = logits(engine, full_inputs)
    out["hpz"] = run
    return out


def _partitioned_over(deepspeed: Any, group: Any, world_size: int) -> dict[str, Any]:
    """The tiny model partitioned over ``group`` (``zero.Init(module=...)``, as under ``zero.Init``),
    with :func:`workers.merge_sites_model`'s LoRA: its fingerprint and, after ``merge()``, its
    weights."""
    model = _base_model()
    deepspeed.zero.Init(module=model, data_parallel_group=group, config_dict_or_path=ds_config(3, world_size))
    model, delta = workers.merge_sites_model(model)
    found = {"group_size": {torch.distributed.get_world_size(p.ds_process_group)
                            for p in model.parameters() if hasattr(p, "ds_process_group")},
             "fingerprint": workers.fingerprint(model, delta)}
    delta.merge()
    found["merged"] = delta.engine.gather(dict(model.named_parameters()))
    return found


def trainer_config(name: str = "zero3") -> dict[str, Any]:
    """A shipped config (``configs/deepspeed/<name>.json``, "auto" values left for the Trainer)."""
    config = json.loads((Path(REPO_ROOT) / "configs" / "deepspeed" / f"{name}.json").read_text())
    if config["zero_optimization"]["stage"] == 3:  # keep the tiny model's parameters partitioned
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config


def trainer_dataset() -> list[dict[str, torch.Tensor]]:
    """8 examples: 2 optimizer steps per epoch at 2 ranks x 2 examples."""
    from tests.tiny import tiny_inputs

    inputs = tiny_inputs(workers.FAMILY, batch=8, seq=8, seed=11)
    return [{"input_ids": inputs["input_ids"][i], "attention_mask": inputs["attention_mask"][i],
             "labels": torch.tensor(i % 3)} for i in range(8)]


TRAINER_RUNS = (
    # (run, shipped config, checkpoint to resume from)
    ("uninterrupted", "zero3", None),
    ("resumed", "zero3", "uninterrupted/checkpoint-1"),
    ("zero2", "zero2", None),
    ("zero3_offload", "zero3_offload", None),
)


def trainer_ranks(rank: int, world_size: int, workdir: str) -> dict[str, Any]:
    """Launch 3: ``DeltaTrainer`` with each shipped config, 2 steps, a checkpoint after each step;
    under ZeRO-3 a second Trainer, on a fresh model, resumes from the first checkpoint."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from deltadist.trainer import DeltaTrainer

    deepspeed = _deepspeed()
    out: dict[str, Any] = {}
    for run, config, resume in TRAINER_RUNS:
        unset_hf_deepspeed_config()  # build the backbone normally; initialize partitions it
        model, delta = build(deepspeed, "zero2" if config == "zero2" else "zero3")
        args = TrainingArguments(
            output_dir=os.path.join(workdir, run), deepspeed=trainer_config(config), use_cpu=True,
            per_device_train_batch_size=2, max_steps=2, save_strategy="steps", save_steps=1,
            learning_rate=0.05, logging_strategy="no", report_to="none", disable_tqdm=True, seed=0,
            dataloader_num_workers=0,
        )
        trainer = DeltaTrainer(model=model, args=args, train_dataset=trainer_dataset(), delta=delta)
        trainer.train(resume_from_checkpoint=os.path.join(workdir, resume) if resume else None)
        final = os.path.join(workdir, f"{run}-final")
        trainer.save_model(final)
        out[run] = {
            "final": final, "global_step": trainer.state.global_step,
            "engine": type(trainer.model_wrapped).__name__,
            "delta_partitioned": all(p.numel() == 0 for p in delta.parameters()),
        }
    return out


def _importable(fn: Any) -> Any:
    """``fn`` as the spawned ranks import it: pytest imports this file as a top-level module."""
    return getattr(importlib.import_module("tests.distributed.test_deepspeed"), fn.__name__)


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deepspeed_ops() -> None:
    """Build (or find cached) DeepSpeed's shared-memory comm op once, before any launch.

    ``deepspeed.init_distributed`` on the CPU accelerator JIT-compiles it into
    ``~/.cache/torch_extensions`` (about a minute, the first time on a machine); doing it here keeps
    that minute out of the ranks' deadlines. Cached, this is one ``import deepspeed`` (~3 s).
    """
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    code = ("import os; os.environ.setdefault('DS_ACCELERATOR', 'cpu')\n"
            "from deepspeed.comm.torch import build_shm_op\n"
            "build_shm_op()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"building DeepSpeed's shm comm op failed:\n{result.stderr[-4000:]}"


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    return reference()


@pytest.fixture(scope="module")
def trained(deepspeed_ops, tmp_path_factory) -> tuple[Path, list[dict]]:
    workdir = tmp_path_factory.mktemp("deepspeed")
    ranks = run_ranks(_importable(train_ranks), timeout=LAUNCH_TIMEOUT, args=(str(workdir),))
    return workdir, ranks


@pytest.fixture(scope="module")
def methods_trained(deepspeed_ops, tmp_path_factory) -> list[dict]:
    workdir = tmp_path_factory.mktemp("deepspeed_methods")
    return run_ranks(_importable(method_ranks), timeout=LAUNCH_TIMEOUT, args=(str(workdir),))


@pytest.fixture(scope="module")
def resumed(trained) -> list[dict]:
    workdir, _ = trained
    return run_ranks(_importable(resume_ranks), timeout=LAUNCH_TIMEOUT, args=(str(workdir),))


def _saved(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "delta.safetensors"))


def _is_delta_key(key: str) -> bool:
    """A LoRA tensor or the task head (trained and saved with the delta by default)."""
    return ".lora." in key or key.startswith(workers.HEAD)


def _assert_same_delta(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    assert all(_is_delta_key(key) for key in actual), sorted(actual)
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key  # full logical shapes, not partitions
        torch.testing.assert_close(actual[key], value, **TOL, msg=lambda m, k=key: f"{k}: {m}")


# -- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_training_on_two_ranks_equals_one_process(trained, expected, variant) -> None:
    _, ranks = trained
    run = ranks[0][variant]
    assert run["engine"] == ("ddp" if variant == "zero2" else "deepspeed")
    if variant != "zero2":
        assert run["delta_partitioned"], "the deltas were not partitioned by ZeRO-3"
    saved = _saved(run["path"])
    _assert_same_delta(saved, expected["state"])
    for rank in ranks:  # delta.state_dict() is the full tensor on every rank, equal to the file
        state = rank[variant]["state"]
        assert sorted(state) == sorted(saved)
        assert all(torch.equal(state[k], saved[k]) for k in saved)
        torch.testing.assert_close(rank[variant]["logits"], expected["logits"], **TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reloading_in_one_process_reproduces_the_trained_logits(trained, expected, variant) -> None:
    from deltadist import AutoDeltaModel

    _, ranks = trained
    fresh = _base_model()
    # The fingerprint sampled from partitions must match this plain model's.
    AutoDeltaModel.from_finetuned(ranks[0][variant]["path"], backbone_model=fresh)
    inputs, _ = workers.batch()
    torch.testing.assert_close(logits(fresh, inputs), expected["logits"], **TOL)


@pytest.mark.slow  # one more DeepSpeed launch, ~90 s on 2 CPU cores: CI runs it after the default suite
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", OTHER_METHODS)
def test_every_method_trains_under_zero_as_in_one_process(methods_trained, method, variant) -> None:
    expected = reference(method=method)["state"]
    saved = _saved(methods_trained[0][f"{variant}-{method}"]["path"])
    assert sorted(saved) == sorted(expected)
    assert all(workers.is_delta_key(key, method) for key in saved), sorted(saved)
    for key, value in expected.items():
        assert saved[key].shape == value.shape, key  # full shapes, not partitions
        torch.testing.assert_close(saved[key], value, **TOL, msg=lambda m, k=key: f"{k}: {m}")


def test_merge_under_zero3_gives_the_unmerged_logits(trained) -> None:
    _, ranks = trained
    for rank in ranks:
        run = rank["zero3_init"]
        assert run["merged_children"] == [] and run["unmerged_children"] == ["lora"]
        assert not torch.allclose(run["logits"], _base_logits(), atol=1e-4), "the LoRA did not train"
        torch.testing.assert_close(run["merged_logits"], run["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run["unmerged_logits"], run["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merges_under_zero3_land_in_the_partitions_root_sites_included(trained, kind) -> None:
    _, ranks = trained
    model, _ = workers.merge_sites_model(dora=kind == "dora")
    expected = logits(model, workers.batch()[0])  # one process, LoRA attached
    for rank in ranks:
        for state, value in rank[f"root_merge-{kind}"].items():
            torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, s=state: f"{s}: {m}")


def _base_logits() -> torch.Tensor:
    return logits(_base_model(), workers.batch()[0])


def test_engine_checkpoint_is_delta_only_and_resumes_identically(trained, resumed, expected) -> None:
    workdir, ranks = trained
    engine_dir = workdir / "engine"
    tags = sorted(p.name for p in engine_dir.iterdir() if p.is_dir())
    assert tags == [f"global_step{STEPS - 1}"], tags
    files = sorted(p.name for p in (engine_dir / tags[0]).iterdir())
    assert files == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1)
                     for kind in ("model", "optim")], files
    for name in files[0::2]:  # model states: delta keys only (placeholders), no backbone pieces
        states = torch.load(engine_dir / tags[0] / name, map_location="cpu", weights_only=False)
        assert states["module"] and all(_is_delta_key(k) for k in states["module"]), sorted(states["module"])
        assert not states.get("frozen_param_fragments"), sorted(states["frozen_param_fragments"])

    for rank in resumed:
        assert rank["load_path"] is not None and rank["global_steps"] == STEPS - 1
    uninterrupted = _saved(ranks[0]["zero3"]["path"])
    _assert_same_delta(_saved(resumed[0]["path"]), uninterrupted)
    _assert_same_delta(_saved(resumed[0]["path"]), expected["state"])
    torch.testing.assert_close(resumed[0]["losses"][0], ranks[0]["zero3"]["losses"][-1], rtol=1e-6, atol=0)


def test_from_finetuned_onto_the_engine_or_its_inner_model_refuses_naming_load_finetuned(resumed) -> None:
    """What a user holds after training (``trainer.model``) is the inner module: a delta loaded
    there would be neither partitioned nor trained, so the error points to ``load_finetuned``."""
    for rank in resumed:
        for tag in ("engine", "inner"):
            result = rank["from_finetuned"][tag]
            assert result is not None, f"from_finetuned onto the {tag} was accepted"
            assert "load_finetuned(" in result["error"] and result["children"] == ["lora"], result


def test_load_finetuned_into_the_engine_restores_the_trained_logits(resumed, expected) -> None:
    for rank in resumed:
        torch.testing.assert_close(rank["logits"], expected["logits"], **TOL)


def test_attaching_to_the_inner_model_of_an_initialized_zero3_engine_is_refused(resumed) -> None:
    for rank in resumed:
        refusal = rank["attach_inner"]
        assert refusal["error"] is not None and refusal["is_engine_error"], refusal
        assert refusal["children"] == ["lora"], refusal


@pytest.fixture(scope="module")
def trainer_run(deepspeed_ops, tmp_path_factory) -> tuple[Path, list[dict]]:
    workdir = tmp_path_factory.mktemp("deepspeed_trainer")
    return workdir, run_ranks(_importable(trainer_ranks), timeout=LAUNCH_TIMEOUT, args=(str(workdir),))


@pytest.mark.parametrize("run", [run for run, _, resume in TRAINER_RUNS if resume is None])
def test_trainer_writes_delta_only_checkpoints(trainer_run, run) -> None:
    from deltadist import AutoDeltaModel

    root, ranks = trainer_run
    for rank in ranks:
        assert rank[run]["engine"] == "DeepSpeedEngine" and rank[run]["global_step"] == 2
        assert rank[run]["delta_partitioned"] == (run != "zero2")
    checkpoints = sorted(p.name for p in (root / run).glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]
    assert not [p for p in root.rglob("*") if p.name in FULL_MODEL_FILES]
    for directory in [root / run / c for c in checkpoints] + [root / f"{run}-final"]:
        tensors = _saved(directory)
        assert tensors and all(_is_delta_key(k) for k in tensors), sorted(tensors)
        assert (directory / "delta_config.json").is_file()
    engine_files = list((root / run).glob("checkpoint-*/global_step*/*model_states.pt"))
    assert {f.parent.parent.name for f in engine_files} == set(checkpoints)  # the engine's, to resume
    for states_file in engine_files:
        states = torch.load(states_file, map_location="cpu", weights_only=False)
        assert all(_is_delta_key(k) for k in states["module"]), sorted(states["module"])
        assert not states.get("frozen_param_fragments"), "the frozen backbone was written"
    # A checkpoint is a delta checkpoint: it loads onto a plain backbone (fingerprint included).
    AutoDeltaModel.from_finetuned(root / run / "checkpoint-2", backbone_model=_base_model())
    # Every shipped config trains the same (fp32, same data, same AdamW, same clipping).
    final = _saved(root / f"{run}-final")
    _assert_same_delta(final, _saved(root / "uninterrupted-final"))
    assert all(torch.equal(v, _saved(root / run / "checkpoint-2")[k]) for k, v in final.items())


def test_trainer_under_zero3_resumes_identically(trainer_run) -> None:
    root, ranks = trainer_run
    assert ranks[0]["resumed"]["global_step"] == 2
    _assert_same_delta(_saved(root / "resumed-final"), _saved(root / "uninterrupted-final"))


@pytest.fixture(scope="module")
def sub_groups(deepspeed_ops, tmp_path_factory) -> list[dict]:
    workdir = tmp_path_factory.mktemp("deepspeed_sub_groups")
    # Four ranks on 2 cores: ~45 s (measured; longer while other jobs share the cores).
    return run_ranks(_importable(sub_group_ranks), world_size=4, timeout=400, args=(str(workdir),))


@pytest.mark.slow  # a DeepSpeed launch of 4 ranks
def test_zero_plus_plus_hierarchical_partitioning_trains_saves_and_merges_as_one_process(
        sub_groups, expected) -> None:
    from deltadist import AutoDeltaModel

    run = sub_groups[0]["hpz"]
    assert run["engine"] == "deepspeed"
    assert run["frozen_without_secondary"] == [], "hpZ is not in effect"
    saved = _saved(run["path"])
    _assert_same_delta(saved, expected["state"])  # full shapes
    fingerprint = workers.fingerprint(*workers.build("lora"))  # one process
    for rank in sub_groups:
        hpz = rank["hpz"]
        assert all(torch.equal(hpz["state"][k], saved[k]) for k in saved)
        assert hpz["fingerprint"] == fingerprint
        torch.testing.assert_close(hpz["logits"], expected["logits"], **TOL)
        assert hpz["merged_children"] == []
        torch.testing.assert_close(hpz["merged_logits"], hpz["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hpz["unmerged_logits"], hpz["logits"], rtol=1e-5, atol=1e-5)
    fresh = _base_model()
    AutoDeltaModel.from_finetuned(run["path"], backbone_model=fresh)
    torch.testing.assert_close(logits(fresh, workers.batch()[0]), expected["logits"], **TOL)


@pytest.mark.slow  # a DeepSpeed launch of 4 ranks
def test_partitions_over_a_group_smaller_than_the_world_fingerprint_and_merge_as_one_process(
        sub_groups) -> None:
    """Each rank's piece is found by its rank in the parameter's own partition group, and samples
    are summed, and merged values written, over that group only."""
    model, delta = workers.merge_sites_model()  # one process
    fingerprint = workers.fingerprint(model, delta)
    delta.merge()
    merged = dict(model.named_parameters())
    for rank in sub_groups:
        pairs = rank["pairs"]
        assert pairs["group_size"] == {2}
        assert pairs["fingerprint"] == fingerprint
        assert sorted(pairs["merged"]) == sorted(merged)
        for name, value in merged.items():
            torch.testing.assert_close(pairs["merged"][name], value.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("world_size", [1, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("variant", ["zero1", "zero2"])
def test_attaching_to_the_inner_model_of_an_initialized_zero1_or_zero2_engine_is_refused(
        deepspeed_ops, request, world_size, variant) -> None:
    """ZeRO-1/2 keep parameters whole, so the inner model looks plain; but the optimizer was built
    over its parameters, and a delta attached now would never be stepped. In a world of one too,
    where no distributed engine is detected."""
    ranks = (request.getfixturevalue("sub_groups") if world_size == 4
             else run_ranks(_importable(inner_refusal_ranks), world_size=1, timeout=LAUNCH_TIMEOUT))
    for rank in ranks:
        refusal = rank[f"attach_{variant}"]
        assert refusal["is_engine_error"], refusal["error"]
        assert "before deepspeed.initialize" in refusal["error"], refusal["error"]
        assert refusal["unchanged"]
