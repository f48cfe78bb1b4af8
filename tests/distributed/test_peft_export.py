"""``save_finetuned(format="peft")`` under engines, at world size 2: every rank calls it, the
adapter equals the one-process delta for PEFT, and a refusal raises on every rank (no rank waits)."""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import workers
from tests.distributed.harness import run_ranks


def peft_export_ranks(rank: int, world_size: int, engine: str, workdir: str) -> dict[str, Any]:
    from deltadist import ConfigError

    model, delta = workers.build("lora")
    workers.wrap(model, engine)
    delta.save_finetuned(os.path.join(workdir, "adapter"), format="peft")
    other, bitfit = workers.build("bitfit")
    workers.wrap(other, engine)
    try:
        bitfit.save_finetuned(os.path.join(workdir, "refused"), format="peft")
    except ConfigError as err:
        return {"refused": str(err)}
    return {"refused": None}


def _importable(fn: Any) -> Any:
    """``fn`` as the spawned ranks import it: pytest imports this file as a top-level module."""
    return getattr(importlib.import_module("tests.distributed.test_peft_export"), fn.__name__)


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp1"])
def test_every_rank_saves_the_one_process_adapter(tmp_path, engine) -> None:
    peft = pytest.importorskip("peft")
    from tests.tiny import build_tiny, logits_of, tiny_inputs

    ranks = run_ranks(_importable(peft_export_ranks), args=(engine, str(tmp_path)), timeout=300)
    assert all("only a LoRA delta" in (r["refused"] or "") for r in ranks)
    assert not (tmp_path / "refused").exists()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"]  # the kept head, gathered whole
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved["base_model.model.score.weight"].shape == (3, 32)
    model, _ = workers.build("lora")  # the same seeded delta in one process
    inputs = tiny_inputs(workers.FAMILY)
    with torch.no_grad():
        expected = logits_of(model, inputs)
        base = build_tiny(workers.FAMILY, "cls", seed=workers.MODEL_SEED)
        loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(logits_of(loaded, inputs), expected, rtol=0, atol=1e-5)
