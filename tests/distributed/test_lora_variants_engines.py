"""LoRA's variants under engines on 2 gloo ranks: hot-swapped (``load_finetuned(path, hotswap=True)``)
into a model wrapped by DDP, FSDP2, FSDP1 and DeepSpeed ZeRO-3 they give what a fresh attach of the
swapped-in delta gives in one process; a DoRA and a PiSSA on a bf16 backbone train (fp32) under DDP
and FSDP2 as one process does."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import variant_workers
from tests.distributed.harness import run_ranks
from tests.distributed.test_deepspeed import deepspeed_ops  # noqa: F401 (a fixture)
from tests.unit.methods.test_lora_hotswap import _trained

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """Per variant, a rank-8 and a rank-4 rsLoRA of other scales, saved, and the logits of each."""
    workdir = tmp_path_factory.mktemp("hotswap")
    logits = {}
    for name, variant in variant_workers.VARIANTS.items():
        logits[name] = {
            "first": _trained(workdir, f"{name}-first", 0, **variant_workers.ATTACHED, **variant),
            "second": _trained(workdir, f"{name}-second", 1, lora_r=4, lora_alpha=32, use_rslora=True,
                               **variant)}
    return str(workdir), logits


# ZeRO-3 is one more DeepSpeed launch (~60-90 s on 2 cores): in the slow grid, as elsewhere.
@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "fsdp1", pytest.param("zero3", marks=pytest.mark.slow)])
def test_a_hot_swap_in_a_wrapped_model_gives_a_fresh_attach_of_the_swapped_in_delta(
        saved, engine, request) -> None:
    if engine.startswith("zero"):
        request.getfixturevalue("deepspeed_ops")  # skips without deepspeed
    workdir, expected = saved
    ranks = run_ranks(variant_workers.hotswap_ranks, args=(engine, workdir), timeout=400)
    for rank, result in enumerate(ranks):
        for name, want in expected.items():
            got = result[name]
            assert "error" not in got, f"{engine} rank {rank} {name}: {got.get('error')}"
            for tag, reference in (("first", want["first"]), ("second", want["second"]),
                                   ("back", want["first"])):
                torch.testing.assert_close(got["logits"][tag], reference, rtol=1e-5, atol=1e-5,
                                           msg=lambda m, t=tag, n=name: f"{engine} rank {rank} {n} {t}: {m}")
            assert not torch.allclose(want["first"], want["second"], atol=1e-3)
            # every rank holds the same whole delta after the swaps
            for key, value in ranks[0][name]["state"].items():
                assert torch.equal(got["state"][key], value), key


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_a_bf16_backbone_trains_its_fp32_dora_and_pissa_as_one_process(engine) -> None:
    """The rule of half-precision backbones (fp32 deltas) with the variants under an engine: two SGD
    steps on 2 ranks end where one process on the whole batch ends, within bf16 rounding."""
    expected = variant_workers.half_steps(None, 1, None)
    for rank in run_ranks(variant_workers.half_steps, args=(engine,)):
        for name, want in expected.items():
            assert "error" not in rank[name], f"{engine} {name}: {rank[name].get('error')}"
            state = rank[name]["state"]
            assert sorted(state) == sorted(want["state"])
            for key, value in want["state"].items():
                assert state[key].dtype == torch.float32 and torch.isfinite(state[key]).all(), key
                moved, want_moved = rank[name]["moved"][key], want["moved"][key]
                if key.rpartition(".")[2].startswith("initial_"):  # PiSSA's frozen starting pair
                    # Its SVD is each process's own: LAPACK with another thread count sums in
                    # another order, so equal within float32 rounding, and never moved by a step.
                    assert not moved.any(), key
                    torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-5 * value.abs().max())
                    continue
                # the steps, compared to 5 % of the largest: far above bf16 rounding of the backbone
                assert want_moved.abs().max() > 0, key
                torch.testing.assert_close(moved, want_moved, rtol=0.05, atol=0.05 * want_moved.abs().max(),
                                           msg=lambda m, k=key, n=name: f"{engine} {n} {k}: {m}")
