"""The next thing a PEFT / transformers user does with LoRA's variants (DoRA, PiSSA, LoRA+), each
against a reference: a half-precision backbone (PEFT's same variant on the same model), activation
checkpointing (the gradients without it), ``generate`` (PEFT's tokens, and the merged model's) and
``DeltaTrainer`` (the loss falls, the saved delta reloads to the trained outputs). Hot swap under
DDP and FSDP2 is in ``tests/distributed/test_lora_variants_engines.py``."""

from __future__ import annotations

import pytest
import torch

from deltadist import AutoDeltaModel, ConfigError, DeltaError, LoraModel
from tests.methods.test_checkpointing import _gradients
from tests.methods.test_generate import _generate, _next_logits, _prompts
from tests.tiny import build_tiny, logits_of, tiny_inputs
from tests.unit.methods.test_lora_hotswap import _trained
from tests.unit.methods.test_lora_variants import _from_weights_pair, _move_both, _pair

peft = pytest.importorskip("peft")
HALF_TOL = {torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2}, torch.float16: {"rtol": 1e-3, "atol": 2e-3}}
"""Within a few roundings of the half dtype; the variants move these logits by 0.2 to 0.5."""
VARIANTS = {"dora": {"use_dora": True}, "pissa": {"init_lora_weights": "pissa"}}


def _variant_pair(variant: str, family: str = "llama", dtype: torch.dtype = torch.float32):
    """(backbone with deltadist's variant, deltadist's delta, PEFT's model) holding the same values,
    off the no-op start: DoRA's random A and B copied from PEFT's, PiSSA's pairs moved alike."""
    if variant == "dora":
        base, mine, theirs = _pair(family, dtype, use_dora=True)
    else:
        _, base, mine, theirs = _from_weights_pair(family, "pissa", dtype)
        _move_both(mine, theirs)
    return base, mine, theirs.eval()


# -- half precision ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_half_backbone_gives_peft_logits_and_trains_fp32_variant_parameters(variant, dtype) -> None:
    base, mine, theirs = _variant_pair(variant, dtype=dtype)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        got, expected = logits_of(base, inputs), logits_of(theirs, inputs)
        untouched = logits_of(build_tiny("llama", "lm").to(dtype), inputs)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected, **HALF_TOL[dtype])
    assert (got.float() - untouched.float()).abs().max() > 0.1, "the variant changes nothing"
    # The rule of half-precision backbones (tests/methods/test_half_precision.py): fp32 deltas,
    # the frozen PiSSA starting pair included.
    held = [p for att in mine.record.attachments for p in att.delta.parameters()]
    assert {p.dtype for p in held} == {torch.float32}
    before = {key: p.detach().clone() for key, p in mine.named_parameters()}
    optimizer = torch.optim.AdamW(mine.param_groups(1e-2, loraplus_lr_ratio=4))
    for _ in range(3):
        optimizer.zero_grad()
        loss = logits_of(base, inputs).float().pow(2).mean()
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    for key, param in mine.named_parameters():  # PiSSA's starting pair is saved, frozen
        assert param.dtype == torch.float32 and torch.isfinite(param).all(), key
        assert param.requires_grad != key.rpartition(".")[2].startswith("initial_"), key
        assert torch.equal(param, before[key]) != param.requires_grad, f"{key} trained or did not"
    with torch.no_grad():
        assert torch.isfinite(logits_of(base, inputs)).all()


# -- activation checkpointing --------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_non_reentrant_checkpointing_gives_the_variants_their_gradients(family, variant) -> None:
    config = {"delta_type": "lora", "lora_r": 4, **VARIANTS[variant]}
    expected = _gradients(family, config, reentrant=None)
    got = _gradients(family, config, reentrant=False)
    assert got.keys() == expected.keys()
    assert any(key.endswith(".magnitude") for key in got) == (variant == "dora")
    for key, grad in expected.items():
        if key.rpartition(".")[2].startswith("initial_"):  # PiSSA's frozen starting pair
            assert grad is None and got[key] is None, key
            continue
        assert grad is not None and got[key] is not None, key
        assert grad.abs().sum() > 0, key
        torch.testing.assert_close(got[key], grad, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


# -- generate ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_gives_peft_tokens_and_the_merged_model_the_same(variant, family) -> None:
    base, mine, theirs = _variant_pair(variant, family)
    batch, mask, alone = _prompts()
    plain = build_tiny(family, "lm")
    expected = _generate(theirs, batch, mask)
    got = _generate(base, batch, mask)
    assert torch.equal(got, expected)
    assert not torch.allclose(_next_logits(base, alone), _next_logits(plain, alone), atol=1e-3), \
        "the variant changes nothing"
    assert torch.equal(_generate(base, alone, torch.ones_like(alone))[0], got[0])  # padding aside
    mine.merge()
    assert torch.equal(_generate(base, batch, mask), got)
    mine.unmerge()
    assert torch.equal(_generate(base, batch, mask), got)


# -- DeltaTrainer ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("variant", "loraplus"), [("dora", False), ("dora", True), ("pissa", True)],
                         ids=["dora", "dora-loraplus", "pissa-loraplus"])
def test_delta_trainer_trains_a_variant_and_its_checkpoint_reloads(tmp_path, variant, loraplus) -> None:
    pytest.importorskip("accelerate")  # transformers.Trainer needs it
    from tests.unit.integrations.test_trainer import dataset, eval_logits, make_trainer

    model = build_tiny("llama", "cls", seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        delta = LoraModel(backbone_model=model, lora_r=4, use_rslora=True, **VARIANTS[variant])
    delta.freeze_module()
    start = {key: p.detach().clone() for key, p in delta.named_parameters()}
    extra = {}
    if loraplus:  # the Trainer takes an optimizer built on delta.param_groups (its scheduler scales each)
        extra["optimizers"] = (torch.optim.AdamW(delta.param_groups(0.05, loraplus_lr_ratio=4)), None)
    trainer = make_trainer(tmp_path / "run", model, delta, **extra)

    def loss() -> float:
        model.eval()
        rows = dataset()
        with torch.no_grad():
            out = model(input_ids=torch.stack([r["input_ids"] for r in rows]),
                        attention_mask=torch.stack([r["attention_mask"] for r in rows]),
                        labels=torch.stack([r["labels"] for r in rows]))
        return out.loss.item()

    before = loss()
    trainer.train()
    assert loss() < before
    if loraplus:
        groups = trainer.optimizer.param_groups  # Trainer's scheduler scaled both, kept the ratio
        assert [g["initial_lr"] for g in groups] == [0.05, 0.2]
        b_ids = {id(p) for key, p in delta.named_parameters() if key.endswith(".lora_B")}
        assert b_ids
        assert b_ids <= {id(p) for p in groups[1]["params"]}
    for key, param in delta.named_parameters():  # PiSSA's starting pair stays
        assert torch.equal(param, start[key]) != param.requires_grad, f"{key} trained or did not"
    trained = eval_logits(model)
    trainer.save_model(str(tmp_path / "final"))
    fresh = build_tiny("llama", "cls", seed=0)
    again = AutoDeltaModel.from_finetuned(tmp_path / "final", backbone_model=fresh)
    assert again.config.use_rslora and again.config.to_dict().items() >= VARIANTS[variant].items()
    torch.testing.assert_close(eval_logits(fresh), trained, rtol=0, atol=1e-6)
    checkpoint = AutoDeltaModel.from_finetuned(tmp_path / "run" / "checkpoint-4",
                                               backbone_model=build_tiny("llama", "cls", seed=0))
    torch.testing.assert_close(eval_logits(checkpoint.backbone_model), trained, rtol=0, atol=1e-6)


# -- loading into a merged delta -------------------------------------------------------------------
@pytest.mark.parametrize("hotswap", [False, True], ids=["load", "hotswap"])
def test_loading_into_a_merged_delta_is_refused_and_works_once_unmerged(tmp_path, hotswap) -> None:
    """The old values stay folded into the weights while merged: loading new ones then gave the old
    delta plus the new one (or, checked, a BackboneMismatchError blaming the backbone)."""
    first = _trained(tmp_path, "first", 0, lora_r=8, lora_alpha=16, use_dora=True)
    other = {"lora_r": 4, "lora_alpha": 32} if hotswap else {"lora_r": 8, "lora_alpha": 16}
    second = _trained(tmp_path, "second", 1, use_dora=True, **other)
    model = build_tiny("llama", "lm")
    delta = LoraModel(model, lora_r=8, lora_alpha=16, use_dora=True)
    delta.load_finetuned(tmp_path / "first")
    delta.merge()
    before = delta.state_dict()
    for check_hash in (True, False):
        with pytest.raises(DeltaError, match="merged into the weights; call unmerge"):
            delta.load_finetuned(tmp_path / "second", hotswap=hotswap, check_hash=check_hash)
    with pytest.raises(DeltaError, match="merged into the weights; call unmerge"):
        delta.load_state_dict(before)
    assert all(torch.equal(v, before[k]) for k, v in delta.state_dict().items())
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, inputs), first, rtol=1e-5, atol=1e-5)
        delta.unmerge()
        delta.load_finetuned(tmp_path / "second", hotswap=hotswap)
        torch.testing.assert_close(logits_of(model, inputs), second, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("other", [{"lora_alpha": 32}, {"use_rslora": True}], ids=["alpha", "rslora"])
def test_loading_a_lora_of_another_scale_is_refused_and_hot_swapped_instead(tmp_path, other) -> None:
    """Its tensors fit, so they used to load silently and the delta computed ``s_mine / s_theirs``
    times the saved update."""
    saved = _trained(tmp_path, "other", 1, lora_r=8, use_dora=True, **other)
    model = build_tiny("llama", "lm")
    delta = LoraModel(model, lora_r=8, lora_alpha=16, use_dora=True)
    before = delta.state_dict()
    with pytest.raises(ConfigError, match=r"scales B A by .*, this one by 2 .*hotswap=True"):
        delta.load_finetuned(tmp_path / "other")
    assert all(torch.equal(v, before[k]) for k, v in delta.state_dict().items())
    delta.load_finetuned(tmp_path / "other", hotswap=True)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, tiny_inputs("llama")), saved, rtol=1e-5, atol=1e-5)
