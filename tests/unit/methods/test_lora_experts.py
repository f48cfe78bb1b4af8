"""LoRA on mixture-of-experts models (issue 24 part 3): on fused expert parameters (transformers 5:
``mlp.experts.gate_up_proj: [experts, out, in]``) each expert gets its own pair, against PEFT's
``target_parameters`` (logits, gradients, files both ways); on expert modules (transformers 4.5x)
it is ordinary LoRA per expert linear layer. Tiny Mixtral / Qwen2-MoE / Qwen3-MoE: hidden 64, 2
layers, 4 experts, top 2."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import transformers

import deltadist
from deltadist import DeltaError, LoraModel, SiteError
from deltadist.methods.lora_experts import ExpertLoRA
from tests.tiny import MOE_FAMILIES, build_tiny, logits_of, tiny_inputs

peft = pytest.importorskip("peft")
FUSED = int(transformers.__version__.split(".")[0]) >= 5
needs_fused = pytest.mark.skipif(not FUSED, reason="transformers 4.5x builds experts as modules")
TOL = {"rtol": 1e-5, "atol": 1e-5}
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _experts_lora(family: str, **extra) -> tuple[torch.nn.Module, LoraModel]:
    model = build_tiny(family, "lm")
    delta = LoraModel(model, modified_modules=["experts"], lora_r=4, lora_alpha=8, init_lora_weights=False,
                      **extra)
    delta.freeze_module()
    return model, delta


def _peft_twin(family: str, delta: LoraModel):
    """PEFT's target_parameters LoRA on a fresh copy of the model, holding ``delta``'s tensors."""
    theirs = peft.get_peft_model(build_tiny(family, "lm"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=[], target_parameters=TARGETS))
    mine = {att.site_name: att.delta for att in delta.record.attachments}
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if type(module).__name__ == "ParamWrapper":
                site = name.removeprefix("base_model.model.").replace(".base_layer", "")
                branch = mine[f"{site}.{module.parameter_name}"]
                experts, r, _ = branch.lora_A.shape
                module.lora_A["default"].weight.copy_(branch.lora_A.reshape(experts * r, -1))
                module.lora_B["default"].weight.copy_(branch.lora_B.permute(1, 2, 0).reshape(-1, r * experts))
    return theirs


@needs_fused
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fused_experts_match_peft_target_parameters(family: str) -> None:
    model, delta = _experts_lora(family)
    names = delta.record.site_names
    assert names == [f"model.layers.{i}.mlp.experts.{p}"
                     for i in range(2) for p in ("gate_up_proj", "down_proj")]
    theirs = _peft_twin(family, delta)
    inputs = tiny_inputs(family)
    bare = logits_of(build_tiny(family, "lm"), inputs)
    mine = logits_of(model, inputs)
    assert not torch.allclose(mine, bare, **TOL)  # the update is not zero: the test can fail
    torch.testing.assert_close(mine, logits_of(theirs, inputs), **TOL)
    # gradients: only on the deltas, and equal to PEFT's
    mine.pow(2).sum().backward()
    logits_of(theirs, inputs).pow(2).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp.experts.lora" in n for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    for att in delta.record.attachments:
        wrapper = theirs.get_submodule(f"base_model.model.{att.site_name.rpartition('.')[0]}")
        while wrapper.parameter_name != att.delta.parameter_name:
            wrapper = wrapper.base_layer
        experts, r, _ = att.delta.lora_A.shape
        torch.testing.assert_close(att.delta.lora_A.grad.reshape(experts * r, -1),
                                   wrapper.lora_A["default"].weight.grad, **TOL)


@needs_fused
def test_backbone_keys_unchanged_and_detach_restores() -> None:
    model = build_tiny("mixtral", "lm")
    keys = list(model.state_dict())
    before = logits_of(model, tiny_inputs("mixtral"))
    delta = LoraModel(model, modified_modules=["experts"], lora_r=4, init_lora_weights=False)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts._parameters["gate_up_proj"], torch.nn.Parameter)
    assert "gate_up_proj" not in experts.__dict__  # shadowed only during a call
    logits_of(model, tiny_inputs("mixtral"))
    assert "gate_up_proj" not in experts.__dict__
    assert [k for k in model.state_dict() if ".experts.lora" not in k] == keys
    delta.detach()
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(logits_of(model, tiny_inputs("mixtral")), before)


@needs_fused
def test_shadow_removed_when_the_forward_raises() -> None:
    model, _ = _experts_lora("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    with pytest.raises(Exception):
        experts(torch.zeros(3, 7), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))  # wrong width
    assert "gate_up_proj" not in experts.__dict__ and "down_proj" not in experts.__dict__


@needs_fused
def test_save_load_merge_unmerge_copy_pickle(tmp_path) -> None:
    family = "qwen2_moe"
    model, delta = _experts_lora(family)
    inputs = tiny_inputs(family)
    expected = logits_of(model, inputs)
    delta.save_finetuned(tmp_path / "d")
    other = build_tiny(family, "lm")
    LoraModel.from_finetuned(tmp_path / "d", other)
    torch.testing.assert_close(logits_of(other, inputs), expected, **TOL)
    weight = model.model.layers[1].mlp.experts.down_proj.detach().clone()
    delta.merge()
    merged = model.model.layers[1].mlp.experts.down_proj
    branch = next(a.delta for a in delta.record.attachments
                  if a.site_name.endswith("1.mlp.experts.down_proj"))
    torch.testing.assert_close(merged, weight + branch.delta_weight().detach(), **TOL)
    torch.testing.assert_close(logits_of(model, inputs), expected, **TOL)
    delta.unmerge()
    torch.testing.assert_close(model.model.layers[1].mlp.experts.down_proj, weight, **TOL)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(logits_of(copied, inputs), expected, **TOL)
        with torch.no_grad():  # the copy runs its own delta
            next(m for m in copied.modules() if isinstance(m, ExpertLoRA)).lora_B.zero_()
        torch.testing.assert_close(logits_of(model, inputs), expected, **TOL)


@needs_fused
@pytest.mark.parametrize("direction", ["ours_to_peft", "peft_to_ours"])
def test_peft_files_both_ways(tmp_path, direction: str) -> None:
    family = "mixtral"
    inputs = tiny_inputs(family)
    if direction == "ours_to_peft":
        model, delta = _experts_lora(family)
        expected = logits_of(model, inputs)
        delta.save_finetuned(tmp_path, format="peft")
        loaded = peft.PeftModel.from_pretrained(build_tiny(family, "lm"), tmp_path)
    else:
        theirs = peft.get_peft_model(build_tiny(family, "lm"), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=[], target_parameters=TARGETS[:1], init_lora_weights=False))
        expected = logits_of(theirs, inputs)
        theirs.save_pretrained(tmp_path)
        loaded = build_tiny(family, "lm")
        delta = LoraModel.from_finetuned(tmp_path, loaded)
        assert delta.record.site_names == [f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(2)]
    assert not torch.allclose(expected, logits_of(build_tiny(family, "lm"), inputs), **TOL)
    torch.testing.assert_close(logits_of(loaded, inputs), expected, **TOL)


@needs_fused
def test_common_names_all_linear_and_router() -> None:
    model = build_tiny("qwen2_moe", "lm")
    one = LoraModel(model, modified_modules=["ff.experts.w2"], common_structure=True, lora_r=2)
    assert one.record.site_names == [f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)]
    one.detach()
    every = LoraModel(build_tiny("qwen2_moe", "lm"), modified_modules=["all-linear"], lora_r=2)
    names = every.record.site_names
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert "model.layers.0.mlp.shared_expert.up_proj" in names
    assert "lm_head" not in names and not any(n.endswith("gate.weight") for n in names)
    model = build_tiny("mixtral", "lm")
    before = logits_of(model, tiny_inputs("mixtral"))
    router = LoraModel(model, modified_modules=["ff.router"], common_structure=True, lora_r=2,
                       init_lora_weights=False)
    assert router.record.site_names == [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    assert not torch.allclose(logits_of(model, tiny_inputs("mixtral")), before, **TOL)


@needs_fused
@pytest.mark.parametrize("extra,needle", [({"lora_dropout": 0.1}, "lora_dropout"),
                                          ({"use_dora": True}, "use_dora"),
                                          ({"init_lora_weights": "olora"}, "olora")])
def test_refused_variants_name_the_problem(extra: dict, needle: str) -> None:
    with pytest.raises(SiteError, match=needle):
        LoraModel(build_tiny("mixtral", "lm"), modified_modules=["experts"], lora_r=2, **extra)


def test_a_non_weight_parameter_is_refused() -> None:
    model = build_tiny("mixtral", "lm")
    with pytest.raises(SiteError, match="1-D parameter|linear layer"):
        LoraModel(model, modified_modules=["model.norm"], lora_r=2)


@needs_fused
def test_mixed_batch_serves_all_rows_or_none_and_refuses_some() -> None:
    family = "qwen3_moe"
    model, first = _experts_lora(family)
    inputs = tiny_inputs(family, batch=2)
    alone = logits_of(model, inputs)
    with deltadist.mixed_batch([first, first]):
        torch.testing.assert_close(logits_of(model, inputs), alone)
    second = LoraModel(model, modified_modules=["q_proj"], lora_r=2, init_lora_weights=False)
    with pytest.raises(DeltaError, match="every row"):
        with deltadist.mixed_batch([first, second]):
            pass


def test_expert_modules_get_lora_per_linear_and_mixed_rows() -> None:
    """Expert modules (transformers 4.5x) get ordinary LoRA per linear layer, but an expert is
    called on the tokens its router picked, flattened, not on batch rows: a mixed batch refuses
    serving some rows there (it used to route token i like row i // m: silently wrong). The
    shared expert (5.x) sees every token in row order and routes rows."""
    family = "qwen2_moe"
    pattern = "ff.shared_expert.w2" if FUSED else "ff.experts.$.w2".replace("$", "1")
    model = build_tiny(family, "lm")
    one, two = (LoraModel(model, modified_modules=[pattern], common_structure=True, lora_r=2,
                          init_lora_weights=False) for _ in range(2))
    assert one.record.site_names and all(n.endswith("down_proj") for n in one.record.site_names)
    inputs = tiny_inputs(family, batch=2)
    if not FUSED:
        with pytest.raises(DeltaError, match="tokens its router picked"):
            with deltadist.mixed_batch([one, two]):
                pass
        return
    alone = []
    for delta, other in ((one, two), (two, one)):
        with other.disabled():
            alone.append(logits_of(model, inputs))
    with deltadist.mixed_batch([one, two]):
        mixed = logits_of(model, inputs)
    torch.testing.assert_close(mixed[0], alone[0][0], **TOL)
    torch.testing.assert_close(mixed[1], alone[1][1], **TOL)
