"""BMTrain for real (CUDA and NCCL): skipped, with the reason, on a machine without a GPU.

On one GPU (world size 1) or two, a tiny BERT classifier is converted with
``bmt.BMTrainModelWrapper`` (every parameter a ``DistributedParameter``, every layer a
``bmt.Block``) and gets a LoRA delta either after the conversion (deltadist adopts its
parameters) or before it (the order ``deltadist train`` uses: the deltas go into the blocks'
storage). Two SGD steps on each rank's share of one batch must give the delta a single CPU process
gets from the whole batch; the checkpoint has full shapes and the delta keys only, and reloading
it in one process reproduces the BMTrain model's logits.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.distributed.harness import run_ranks
from tests.tiny import build_tiny, logits_of, tiny_inputs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="BMTrain needs CUDA GPUs (NCCL); the CPU tests are tests/unit/engines/test_bmtrain.py",
)
LORA = {"delta_type": "lora", "lora_r": 4, "unfrozen_modules": ["deltas"]}
BATCH, STEPS, LR = 4, 2, 0.5
ORDERS = ("attach_after_wrapping", "attach_before_wrapping")


def _train(backbone: nn.Module, delta: Any, stepper: Any, rows: slice, device: str) -> None:
    inputs = {k: v[rows].to(device) for k, v in tiny_inputs("bert", batch=BATCH).items()}
    labels = torch.arange(BATCH)[rows].remainder(3).to(device)
    backbone.train()
    for _ in range(STEPS):
        # This rank's part of the whole batch's mean, times the world size (DDP's convention).
        loss = nn.functional.cross_entropy(logits_of(backbone, inputs), labels, reduction="sum")
        (loss * (BATCH // (rows.stop - rows.start)) / BATCH).backward()
        stepper.step()
        stepper.zero_grad()
    backbone.eval()


def bmtrain_ranks(rank: int, world_size: int, port: int, workdir: str) -> dict[str, Any]:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import bmtrain as bmt

    from deltadist import AutoDeltaConfig, AutoDeltaModel
    from deltadist.engines.bmtrain_runtime import BMTrainStepper

    bmt.init_distributed(seed=0)
    share = BATCH // world_size
    results: dict[str, Any] = {}
    for order in ORDERS:
        model = build_tiny("bert").cuda()
        if order == "attach_after_wrapping":
            model = bmt.BMTrainModelWrapper(model)
        torch.manual_seed(0)
        delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(LORA), backbone_model=model)
        delta.freeze_module()
        if order == "attach_before_wrapping":
            model = bmt.BMTrainModelWrapper(model)
        stepper = BMTrainStepper(torch.optim.SGD(delta.parameters(), lr=LR), world_size)
        _train(model, delta, stepper, slice(rank * share, (rank + 1) * share), "cuda")
        delta.save_finetuned(Path(workdir) / order)
        with torch.no_grad():
            logits = logits_of(model, {k: v.cuda() for k, v in tiny_inputs("bert").items()})
        results[order] = {"engine": delta.engine.name, "logits": logits.cpu()}
    return results


def reference(workdir: Path) -> torch.Tensor:
    """The same training in one CPU process on the whole batch; its delta saved in ``workdir``."""
    from deltadist import AutoDeltaConfig, AutoDeltaModel

    model = build_tiny("bert")
    torch.manual_seed(0)
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(LORA), backbone_model=model)
    delta.freeze_module()
    _train(model, delta, torch.optim.SGD(delta.parameters(), lr=LR), slice(0, BATCH), "cpu")
    delta.save_finetuned(workdir)
    return logits_of(model, tiny_inputs("bert"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world_size", [1, 2])
def test_bmtrain_trains_saves_and_reloads_the_delta_of_one_process(tmp_path, world_size) -> None:
    pytest.importorskip("bmtrain", reason="bmtrain is not installed (pip install bmtrain)")
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs, found {torch.cuda.device_count()}")
    from safetensors.torch import load_file

    from deltadist import AutoDeltaModel
    from deltadist.io.checkpoint import WEIGHTS_NAME

    expected_logits = reference(tmp_path / "reference")
    expected = load_file(tmp_path / "reference" / WEIGHTS_NAME)
    results = run_ranks(bmtrain_ranks, world_size=world_size, timeout=600,
                        args=(_free_port(), str(tmp_path)))
    for order in ORDERS:
        assert results[0][order]["engine"] == "bmtrain"
        saved = load_file(tmp_path / order / WEIGHTS_NAME)
        assert saved.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5, msg=key)
        fresh = build_tiny("bert")
        AutoDeltaModel.from_finetuned(tmp_path / order, backbone_model=fresh)
        torch.testing.assert_close(logits_of(fresh, tiny_inputs("bert")), results[0][order]["logits"],
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(results[0][order]["logits"], expected_logits, rtol=1e-4, atol=1e-4)
