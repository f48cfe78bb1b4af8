"""LoRA on fused expert parameters under ``torch.compile`` and hot swap: the parameter offset
(``W + s B A`` put into the experts module's instance ``__dict__`` by a pre-hook for the call) gives
the eager outputs compiled, reads the LoRA's current values (no stale sum baked into the graph),
and ``load_finetuned(path, hotswap=True)`` replaces an expert LoRA in place (ranks padded) without
recompiling, giving what a fresh attach gives. Tiny Mixtral (transformers 5's fused experts); on
torch 2.13 Dynamo traces the ``__dict__`` shadow without a graph break (one graph, as the bare
model)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch._dynamo.testing import CompileCounter

from deltadist import LoraModel
from tests.tiny import build_tiny, logits_of, tiny_inputs

pytestmark = pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                                reason="transformers 4.5x builds experts as modules")
TOL = {"rtol": 1e-5, "atol": 1e-5}
FAMILY = "mixtral"


def _attached(**config) -> tuple[torch.nn.Module, LoraModel]:
    model = build_tiny(FAMILY, "lm")
    delta = LoraModel(model, modified_modules=["experts", "q_proj"], unfrozen_modules=["deltas"],
                      **{"lora_r": 4, "lora_alpha": 8, "init_lora_weights": False, **config})
    return model, delta


def _randomize(delta: LoraModel, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in delta.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiled_expert_lora_gives_eager_outputs_and_reads_current_values(backend) -> None:
    model, delta = _attached()
    _randomize(delta, 0)
    inputs = tiny_inputs(FAMILY)
    bare = logits_of(build_tiny(FAMILY, "lm"), inputs)
    eager = logits_of(model, inputs)
    assert not torch.allclose(eager, bare, **TOL)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    torch.testing.assert_close(logits_of(compiled, inputs), eager, **TOL)
    experts = model.model.layers[0].mlp.experts
    assert "gate_up_proj" not in experts.__dict__ and "down_proj" not in experts.__dict__  # shadow gone
    _randomize(delta, 1)  # new values in place: the compiled graph must read them, not a stale sum
    changed = logits_of(model, inputs)
    assert not torch.allclose(changed, eager, **TOL)
    torch.testing.assert_close(logits_of(compiled, inputs), changed, **TOL)
    # gradients through the compiled model reach the expert LoRA
    model.zero_grad()
    compiled(**inputs).logits.pow(2).mean().backward()
    assert experts.lora.lora_A.grad is not None and experts.lora.lora_A.grad.abs().sum() > 0


def _saved(tmp_path, name: str, seed: int, **config) -> torch.Tensor:
    model, delta = _attached(**config)
    _randomize(delta, seed)
    delta.save_finetuned(tmp_path / name)
    return logits_of(model, tiny_inputs(FAMILY))


def test_hotswap_replaces_an_expert_lora_in_place_without_recompiling(tmp_path) -> None:
    first = _saved(tmp_path, "first", 0)
    second = _saved(tmp_path, "second", 1, lora_r=2, lora_alpha=32)  # padded up to rank 4, another scale
    model, delta = _attached()
    delta.load_finetuned(tmp_path / "first")
    experts = model.model.layers[0].mlp.experts
    before = {n: p.data_ptr() for n, p in delta.named_parameters()}
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    inputs = tiny_inputs(FAMILY)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(compiled, inputs), first, **TOL)
        frames = counter.frame_count
        assert frames > 0
        delta.load_finetuned(tmp_path / "second", hotswap=True)
        torch.testing.assert_close(logits_of(compiled, inputs), second, **TOL)
        assert experts.lora.lora_A.shape == (4, 4, 64)  # this delta's rank, the rest zero
        assert experts.lora.lora_A[:, 2:].abs().sum() == 0
        delta.load_finetuned(tmp_path / "first", hotswap=True)
        torch.testing.assert_close(logits_of(compiled, inputs), first, **TOL)
    assert counter.frame_count == frames, "the swap recompiled"
    assert {n: p.data_ptr() for n, p in delta.named_parameters()} == before, "not replaced in place"
