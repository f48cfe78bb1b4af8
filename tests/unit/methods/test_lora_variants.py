"""LoRA's variants as config fields -- rsLoRA, DoRA, the initialisations, LoRA+ -- against PEFT's
own (``use_rslora``, ``use_dora``, ``init_lora_weights``, ``create_loraplus_optimizer``): the same
tensors give the same logits, gradients and merged weights, and PEFT's files go both ways."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

import deltadist
from deltadist import AdapterModel, AutoDeltaModel, ConfigError, DeltaError, LoraModel
from deltadist.engines.runtime import EngineSetup
from deltadist.training.batching import Collator, plan_steps
from deltadist.training.config import TrainingConfig
from deltadist.training.steps import prepare_steps
from tests.mixed_rows import assert_rows_as_alone
from tests.tiny import build_tiny, logits_of, tiny_inputs

peft = pytest.importorskip("peft")
TOL = {"rtol": 1e-5, "atol": 1e-5}
SITES = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
HEADS = {"llama": "lm", "gpt2": "lm", "bert": "cls"}


def _pair(family: str, dtype: torch.dtype = torch.float32, **variant):
    """A PEFT LoRA with random A and B (``init_lora_weights=False``) and deltadist's LoRA of the
    same shape and variant on a copy of the same model (in ``dtype``), holding PEFT's tensors."""
    base = build_tiny(family, HEADS[family]).to(dtype)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=SITES[family], init_lora_weights=False,
        fan_in_fan_out=family == "gpt2", **variant))
    mine = LoraModel(base, modified_modules=SITES[family], lora_r=4, lora_alpha=8,
                     unfrozen_modules=["deltas"], **variant)
    mine.freeze_module()
    state = theirs.state_dict()
    with torch.no_grad():
        for att in mine.record.attachments:
            prefix = f"base_model.model.{att.site_name}"
            att.delta.lora_A.copy_(state[f"{prefix}.lora_A.default.weight"])
            att.delta.lora_B.copy_(state[f"{prefix}.lora_B.default.weight"])
            if variant.get("use_dora"):
                att.delta.magnitude.copy_(state[f"{prefix}.lora_magnitude_vector.default.weight"])
    return base, mine, theirs


def _logits_and_grads(model, delta_params, family: str):
    logits = logits_of(model, tiny_inputs(family))
    logits.pow(2).sum().backward()
    return logits.detach(), [p.grad.clone() for p in delta_params]


def _peft_params(theirs, mine) -> list[torch.nn.Parameter]:
    """PEFT's A, B (and magnitude) in the order of deltadist's parameters: per site A, B, magnitude."""
    named = dict(theirs.named_parameters())
    parts = ("lora_A.default.weight", "lora_B.default.weight", "lora_magnitude_vector.default.weight")
    return [named[f"base_model.model.{att.site_name}.{part}"] for att in mine.record.attachments
            for part in parts if f"base_model.model.{att.site_name}.{part}" in named]


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("variant", [{"use_rslora": True}, {"use_dora": True},
                                     {"use_dora": True, "use_rslora": True}], ids=["rslora", "dora", "both"])
def test_forward_and_backward_equal_peft(family, variant) -> None:
    base, mine, theirs = _pair(family, **variant)
    expected, their_grads = _logits_and_grads(theirs, _peft_params(theirs, mine), family)
    got, my_grads = _logits_and_grads(base, list(mine.parameters()), family)
    torch.testing.assert_close(got, expected, **TOL)
    assert len(my_grads) == len(their_grads) == len(mine.sites) * (3 if variant.get("use_dora") else 2)
    for mine_grad, their_grad in zip(my_grads, their_grads):
        torch.testing.assert_close(mine_grad, their_grad, **TOL)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_dora_merges_as_peft_and_unmerges_back(family) -> None:
    base, mine, theirs = _pair(family, use_dora=True)
    inputs = tiny_inputs(family)
    with torch.no_grad():
        expected = logits_of(base, inputs)
        original = {n: p.clone() for n, p in base.named_parameters() if "lora" not in n}
        mine.merge()
        torch.testing.assert_close(logits_of(base, inputs), expected, **TOL)
        merged = theirs.merge_and_unload()
        for site in mine.sites:
            torch.testing.assert_close(base.get_submodule(site).weight, merged.get_submodule(site).weight,
                                       **TOL)
        mine.unmerge()
        for name, param in base.named_parameters():
            if "lora" not in name:
                torch.testing.assert_close(param, original[name], rtol=0, atol=1e-6)


def test_a_fresh_dora_starts_as_the_base_model_with_its_row_norms() -> None:
    model = build_tiny("llama", "lm")
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        before = logits_of(model, inputs)
    delta = LoraModel(model, lora_r=4, use_dora=True)
    att = delta.record.attachments[0]
    torch.testing.assert_close(att.delta.magnitude, att.site.weight.norm(dim=1), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, inputs), before, **TOL)
    theirs = peft.get_peft_model(build_tiny("llama", "lm"), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                             use_dora=True))
    their_magnitude = dict(theirs.named_parameters())[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight"]
    torch.testing.assert_close(att.delta.magnitude, their_magnitude, rtol=1e-6, atol=1e-6)


def test_dora_row_norms_need_no_merged_weight() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24))
    delta = LoraModel(model, modified_modules=["0"], lora_r=3, use_dora=True, init_lora_weights=False)
    branch = delta.record.attachments[0].delta
    direct = (model[0].weight + branch.scaling * branch.lora_B @ branch.lora_A).norm(dim=1)
    torch.testing.assert_close(branch.row_norms(model[0].weight), direct.detach(), rtol=1e-6, atol=1e-6)


def test_unmerging_a_dora_merged_elsewhere_is_refused() -> None:
    model = build_tiny("llama", "lm")
    delta = LoraModel(model, lora_r=4, use_dora=True)
    branch = delta.record.attachments[0].delta
    with pytest.raises(DeltaError, match="was not merged here"):
        branch.fold_into(delta.record.attachments[0].site, delta.engine, -1.0)


def test_the_initialisations() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    gaussian = LoraModel(model, modified_modules=["0"], lora_r=8, init_lora_weights="gaussian")
    branch = gaussian.record.attachments[0].delta
    assert torch.count_nonzero(branch.lora_B) == 0
    assert branch.lora_A.std().item() == pytest.approx(1 / 8, rel=0.1)
    gaussian.detach()
    random_b = LoraModel(model, modified_modules=["0"], lora_r=8, init_lora_weights=False)
    assert torch.count_nonzero(random_b.record.attachments[0].delta.lora_B) > 0
    with pytest.raises(ConfigError, match="init_lora_weights must be one of 'gaussian'"):
        LoraModel(torch.nn.Sequential(torch.nn.Linear(4, 4)), modified_modules=["0"],
                  init_lora_weights="pisa")


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_variants_go_to_peft_and_back(tmp_path, family) -> None:
    base, mine, _ = _pair(family, use_dora=True, use_rslora=True)
    with torch.no_grad():
        for att in mine.record.attachments:
            att.delta.magnitude.mul_(1.5)  # trained away from the row norms
        tuned = logits_of(base, tiny_inputs(family))
    mine.save_finetuned(tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    theirs = peft.PeftModel.from_pretrained(build_tiny(family, HEADS[family]), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(theirs, tiny_inputs(family)), tuned, **TOL)
    theirs.save_pretrained(str(tmp_path / "from_peft"))
    fresh = build_tiny(family, HEADS[family])
    again = AutoDeltaModel.from_finetuned(tmp_path / "from_peft", backbone_model=fresh)
    assert again.config.use_dora and again.config.use_rslora
    with torch.no_grad():
        torch.testing.assert_close(logits_of(fresh, tiny_inputs(family)), tuned, **TOL)


def test_a_dora_delta_reloads_from_its_own_checkpoint(tmp_path) -> None:
    base, mine, _ = _pair("llama", use_dora=True)
    with torch.no_grad():
        tuned = logits_of(base, tiny_inputs("llama"))
    mine.save_finetuned(tmp_path)
    fresh = build_tiny("llama", "lm")
    AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(fresh, tiny_inputs("llama")), tuned, **TOL)


def test_dora_rows_in_a_mixed_batch_equal_each_alone() -> None:
    model = build_tiny("llama", "lm")
    first = LoraModel(model, lora_r=4, use_dora=True, init_lora_weights=False, delta_name="first")
    second = LoraModel(model, lora_r=2, use_dora=True, init_lora_weights=False, delta_name="second")
    with torch.no_grad():
        for delta in (first, second):
            for att in delta.record.attachments:
                att.delta.magnitude.mul_(torch.linspace(0.5, 1.5, att.delta.magnitude.numel()))
    assert_rows_as_alone(model, [first, second], [first, second, None], tiny_inputs("llama", batch=3), **TOL)


def test_a_model_with_dora_deep_copies_and_pickles() -> None:
    model = build_tiny("llama", "lm")
    LoraModel(model, lora_r=4, use_dora=True, init_lora_weights=False)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        expected = logits_of(model, inputs)
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(logits_of(twin, inputs), expected, rtol=0, atol=0)


def test_loraplus_groups_as_peft() -> None:
    base, mine, theirs = _pair("llama", use_dora=True)
    groups = mine.param_groups(1e-3, loraplus_lr_ratio=16)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    names = {id(p): n for n, p in mine.named_parameters()}
    assert sorted(names[id(p)].rsplit(".", 1)[1] for p in groups[0]["params"]) == ["lora_A"] * len(mine.sites)
    assert sorted({names[id(p)].rsplit(".", 1)[1] for p in groups[1]["params"]}) == ["lora_B", "magnitude"]
    from peft.optimizers import create_loraplus_optimizer

    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3,
                                          loraplus_lr_ratio=16)
    their_sizes = sorted((g["lr"], len(g["params"])) for g in optimizer.param_groups if g["params"])
    assert their_sizes == sorted((g["lr"], len(g["params"])) for g in groups)
    assert mine.param_groups(1e-3) == [{"params": list(mine.parameters()), "lr": 1e-3}]


def test_loraplus_is_refused_where_there_is_no_b() -> None:
    adapter = AdapterModel(build_tiny("bert", "cls"), bottleneck_dim=4)
    with pytest.raises(ConfigError, match="LoRA's B matrices"):
        adapter.param_groups(1e-3, loraplus_lr_ratio=16)
    with pytest.raises(ConfigError, match="loraplus_lr_ratio must be a positive number"):
        adapter.param_groups(1e-3, loraplus_lr_ratio=0)
    with pytest.raises(deltadist.ConfigError, match="loraplus_lr_ratio"):
        TrainingConfig(loraplus_lr_ratio=-1.0)


def test_the_training_job_steps_lora_b_at_the_loraplus_rate() -> None:
    model = build_tiny("llama", "lm")
    delta = LoraModel(model, lora_r=4, use_dora=True)
    delta.freeze_module()
    training = TrainingConfig(batch_size=2, lr=0.01, loraplus_lr_ratio=8.0)
    engine = EngineSetup(name="plain", device=torch.device("cpu"), wrap=lambda m: m)
    plan = plan_steps(2, None, None, 1, 4, 1, None)
    steps = prepare_steps(engine, model, delta, training, plan, "causal_lm", torch.float32,
                          Collator("causal_lm", 0))
    groups = steps.stepper.param_groups
    assert [g["lr"] for g in groups] == [0.01, 0.08]
    b_ids = {id(att.delta.lora_B) for att in delta.record.attachments}
    assert b_ids <= {id(p) for p in groups[1]["params"]}
    assert not b_ids & {id(p) for p in groups[0]["params"]}


def _from_weights_pair(family: str, init: str, dtype: torch.dtype = torch.float32):
    """PEFT's and deltadist's LoRA with ``init`` (PiSSA / OLoRA) on copies of one model (in
    ``dtype``), both then moved by the same seeded steps."""
    base = build_tiny(family, HEADS[family]).to(dtype)
    pristine = copy.deepcopy(base)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=SITES[family], init_lora_weights=init,
        fan_in_fan_out=family == "gpt2"))
    mine = LoraModel(base, modified_modules=SITES[family], lora_r=4, lora_alpha=8, init_lora_weights=init,
                     unfrozen_modules=["deltas"])
    return pristine, base, mine, theirs


def _move_both(mine, theirs) -> None:
    """The same seeded step on deltadist's A and B and (unless ``None``) PEFT's."""
    named = dict(theirs.named_parameters()) if theirs is not None else None
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for att in mine.record.attachments:
            for part in ("lora_A", "lora_B"):
                step = torch.randn(getattr(att.delta, part).shape, generator=generator) * 0.05
                getattr(att.delta, part).add_(step)
                if named is not None:
                    named[f"base_model.model.{att.site_name}.{part}.default.weight"].add_(step)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_start_as_peft_without_touching_the_backbone(family, init) -> None:
    pristine, base, mine, theirs = _from_weights_pair(family, init)
    named = dict(theirs.named_parameters())
    pairs = [(getattr(att.delta, part), named[f"base_model.model.{att.site_name}.{part}.default.weight"])
             for att in mine.record.attachments for part in ("lora_A", "lora_B")]
    # PEFT 0.21's OLoRA factorises Conv1D's [in, out] weight as stored (it ignores fan_in_fan_out),
    # so its A and B have the wrong widths on GPT-2; deltadist factorises [out, in] as for nn.Linear.
    peft_agrees = all(a.shape == b.shape for a, b in pairs)
    assert peft_agrees or (init, family) == ("olora", "gpt2")
    for ours, peft_value in pairs if peft_agrees else []:
        torch.testing.assert_close(ours, peft_value, **TOL)
    inputs = tiny_inputs(family)
    with torch.no_grad():
        untouched = logits_of(pristine, inputs)
        torch.testing.assert_close(logits_of(base, inputs), untouched, **TOL)  # starts as the base model
        _move_both(mine, theirs if peft_agrees else None)
        tuned = logits_of(base, inputs)
        if peft_agrees:
            torch.testing.assert_close(tuned, logits_of(theirs, inputs), **TOL)
        assert not torch.allclose(tuned, untouched, atol=1e-4)
    for name, param in pristine.named_parameters():  # PEFT wrote a residual; deltadist wrote nothing
        assert torch.equal(base.get_parameter(name), param), name
    mine.merge()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(base, inputs), tuned, **TOL)
    mine.unmerge()
    mine.detach()
    for name, param in pristine.named_parameters():
        torch.testing.assert_close(base.get_parameter(name), param, rtol=0, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_goes_to_peft_as_its_converted_lora_and_reloads(tmp_path, init) -> None:
    _, base, mine, theirs = _from_weights_pair("llama", init)
    _move_both(mine, theirs)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        tuned = logits_of(base, inputs)
    mine.save_finetuned(tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    loaded = peft.PeftModel.from_pretrained(build_tiny("llama", "lm"), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded, inputs), tuned, **TOL)
    mine.save_finetuned(tmp_path / "own")
    fresh = build_tiny("llama", "lm")
    again = AutoDeltaModel.from_finetuned(tmp_path / "own", backbone_model=fresh)
    assert again.config.init_lora_weights == init
    with torch.no_grad():
        torch.testing.assert_close(logits_of(fresh, inputs), tuned, rtol=0, atol=1e-6)
    assert all(not p.requires_grad for att in again.record.attachments for p in att.delta.fixed_parameters())


def test_a_fast_pissa_starts_at_zero_and_a_pissa_dora_is_refused() -> None:
    model = build_tiny("llama", "lm")
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        before = logits_of(model, inputs)
    delta = LoraModel(model, lora_r=2, init_lora_weights="pissa_niter_4")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, inputs), before, **TOL)
    assert torch.count_nonzero(delta.record.attachments[0].delta.lora_B) > 0
    with pytest.raises(ConfigError, match="with use_dora is not supported"):
        LoraModel(build_tiny("llama", "lm"), init_lora_weights="olora", use_dora=True)


def test_a_peft_pissa_adapter_saved_without_conversion_is_refused(tmp_path) -> None:
    theirs = peft.get_peft_model(build_tiny("llama", "lm"), peft.LoraConfig(
        r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    theirs.save_pretrained(str(tmp_path))  # needs PEFT's residual base model to mean anything
    model = build_tiny("llama", "lm")
    with pytest.raises(deltadist.CheckpointError, match="init_lora_weights='pissa' without conversion"):
        AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model)
    assert not deltadist.deltas_on(model)
