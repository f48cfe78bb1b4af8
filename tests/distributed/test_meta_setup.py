"""The meta-device setup order (``prepare_model``) gives what the real-weight path gives."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import meta_workers
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "fsdp1"])
def test_meta_setup_equals_real_weights(engine: str, tmp_path) -> None:
    meta_workers._model().save_pretrained(tmp_path)
    both = run_ranks(meta_workers.both_paths, args=(engine, str(tmp_path)), timeout=300)[0]
    real, meta = both["real"], both["meta"]
    assert meta["engine"] == real["engine"] != "plain"
    torch.testing.assert_close(meta["logits"], real["logits"], rtol=0, atol=0)
    assert meta["delta"].keys() == real["delta"].keys()
    for key, value in real["delta"].items():
        torch.testing.assert_close(meta["delta"][key], value, rtol=0, atol=0, msg=key)
