"""QLoRA at world size 2: NF4 weights replicated (DDP) or sharded (FSDP2) train the delta a
single process trains."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao")

from tests.distributed.harness import run_ranks  # noqa: E402
from tests.qlora import QLORA_DELTAS, qlora_ranks, qlora_run, wide_llama  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_nf4_backbone_trains_the_single_process_delta(engine: str, tmp_path) -> None:
    wide_llama().save_pretrained(tmp_path)
    ranks = run_ranks(qlora_ranks, args=(engine, str(tmp_path)), timeout=400)
    for name, config in QLORA_DELTAS.items():
        single = qlora_run("plain", str(tmp_path), config)
        for rank in ranks:
            got = rank[name]
            assert got["quantized"] == single["quantized"] and len(got["quantized"]) == 14, name
            assert got["delta"].keys() == single["delta"].keys()
            for key, value in single["delta"].items():
                torch.testing.assert_close(got["delta"][key], value, rtol=1e-5, atol=1e-6,
                                           msg=f"{name} {key}")
            torch.testing.assert_close(got["logits"], single["logits"], rtol=1e-5, atol=1e-5)
    if engine == "fsdp2":  # each rank stores half of every 4-bit weight
        assert ranks[0]["lora"]["bits"][1] < single["bits"][1] * 0.75
