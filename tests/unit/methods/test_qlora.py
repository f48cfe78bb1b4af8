"""4-bit (NF4) backbones: quantized as the checkpoint is read, deltas trained on top, saved,
moved to the full-precision checkpoint and merged into a dequantized model."""

from __future__ import annotations

import weakref

import pytest
import torch

pytest.importorskip("torchao")

from deltadist import AutoDeltaModel, prepare_model  # noqa: E402
from deltadist.core import quantized  # noqa: E402
from deltadist.engines.storage import plain_values  # noqa: E402
from deltadist.errors import SiteError  # noqa: E402
from deltadist.io import backbone_weights  # noqa: E402
from tests.qlora import LORA, QLORA_DELTAS, WIDE, qlora_run, wide_llama  # noqa: E402
from tests.tiny import tiny_inputs  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("wide_llama")
    wide_llama().save_pretrained(path)
    return str(path)


def _reference(delta_config: dict, values: dict[str, torch.Tensor]):
    """The full-precision model quantized in place, with a delta holding ``values``."""
    model = wide_llama()
    quantized.quantize_backbone(model)
    delta = AutoDeltaModel.from_config(delta_config, backbone_model=model)
    delta.load_state_dict(values)
    return model, delta


@pytest.mark.parametrize("method", sorted(QLORA_DELTAS))
def test_quantized_while_loading_equals_quantizing_the_loaded_model(method: str, weights: str) -> None:
    run = qlora_run("plain", weights, QLORA_DELTAS[method], steps=2)
    model, _ = _reference(QLORA_DELTAS[method], run["delta"])
    inputs = tiny_inputs("llama", batch=4, seq=8, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(run["logits"], model(**inputs).logits, rtol=0, atol=0)
    # Every projection of the blocks is NF4; embeddings, norms and the head stay full precision.
    assert len(run["quantized"]) == 2 * 7 and all(".layers." in n for n in run["quantized"])
    assert run["with_grad"] and all(name.startswith("score.") is False for name in run["quantized"])
    assert not [n for n in run["with_grad"] if n in run["quantized"]]
    bits, values = quantized.storage_bits(model.model.layers[0].self_attn.k_proj)
    # 4-bit codes, an 8-bit scaler per 64 values, a float32 factor per 256 scalers, one float32 mean.
    assert bits == values * (4 + 8 / 64 + 32 / (64 * 256)) + 32


def test_one_full_precision_weight_at_a_time(weights: str, monkeypatch) -> None:
    alive: list[weakref.ref] = []
    real = quantized.to_nf4

    def watched(weight: torch.Tensor, like=None):
        assert all(ref() is None for ref in alive), "an earlier full-precision weight is still alive"
        if not weight.is_meta:
            alive.append(weakref.ref(weight))
        return real(weight, like)

    monkeypatch.setattr(backbone_weights, "to_nf4", watched)
    qlora_run("plain", weights, LORA, steps=0)
    assert len(alive) == 14


def test_delta_moves_between_the_nf4_backbone_and_its_checkpoint(weights: str, tmp_path) -> None:
    run_model = prepare_model(wide_llama, LORA, "plain", weights, delta_seed=3, quantize="nf4")
    with torch.no_grad():
        for param in run_model.delta.parameters():
            param.add_(0.01)
    run_model.delta.save_finetuned(tmp_path / "qlora")
    full = wide_llama()
    delta = AutoDeltaModel.from_finetuned(tmp_path / "qlora", backbone_model=full)  # fingerprint agrees
    for key, value in run_model.delta.state_dict().items():
        torch.testing.assert_close(delta.state_dict()[key], value, rtol=0, atol=0)
    other = wide_llama()
    with torch.no_grad():
        other.model.embed_tokens.weight.mul_(1.1)
    with pytest.raises(Exception, match="embed_tokens"):  # not quantized: still tells checkpoints apart
        AutoDeltaModel.from_finetuned(tmp_path / "qlora", backbone_model=other)


def test_merge_refuses_4_bit_weights_and_merge_and_unload_dequantizes(weights: str) -> None:
    prepared = prepare_model(wide_llama, {**LORA, "init_lora_weights": False}, "plain", weights,
                             delta_seed=3, quantize="nf4")
    inputs = tiny_inputs("llama", batch=2, seq=8, seed=1)
    with torch.no_grad():
        want = prepared.model(**inputs).logits
    with pytest.raises(SiteError, match="4 bits.*merge_and_unload"):
        prepared.delta.merge()
    assert not prepared.delta.merged
    model = prepared.delta.merge_and_unload(dtype=torch.float64)
    assert not [n for n, p in model.named_parameters() if quantized.is_quantized(p)]
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    with torch.no_grad():
        got = model(**inputs).logits
    torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-5)


def test_unknown_scheme_and_unblockable_rows_are_named(weights: str) -> None:
    with pytest.raises(Exception, match="unknown scheme 'int3'"):
        quantized.quantize_backbone(wide_llama(), "int3")
    with pytest.raises(Exception, match="multiple of 64"):
        quantized.to_nf4(torch.zeros(8, 40))
    from tests.tiny import build_tiny

    assert len(quantized.quantizable_linears(wide_llama())) == 14  # not the task head "score"
    lm = build_tiny("llama", "lm", **{**WIDE, "vocab_size": 128})
    assert "lm_head" not in quantized.quantizable_linears(lm)


BNB_FAMILIES = {"llama": (WIDE, LORA["modified_modules"]),
                "bert": ({"hidden_size": 256, "intermediate_size": 512}, ["query", "value", "output.dense"]),
                "gpt2": ({"n_embd": 256}, ["c_attn", "c_fc"])}
"""Families bitsandbytes' 4-bit layers are tested on: config overrides, LoRA's sites."""


def _bnb_model(weights: str, skip: tuple[str, ...] = ("classifier", "score")):
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=list(skip))
    # dtype named: transformers 4.57 loads the layers it does not quantize in fp16 by default.
    return AutoModelForSequenceClassification.from_pretrained(weights, quantization_config=config,
                                                              device_map="cpu", dtype=torch.float32)


@pytest.mark.parametrize("family", sorted(BNB_FAMILIES))
@pytest.mark.parametrize("dora", [False, True])
def test_bitsandbytes_4_bit_layers_equal_peft_on_them(dora: bool, family: str, tmp_path) -> None:
    """transformers' load_in_4bit (bitsandbytes' Linear4bit, weights packed [n/2, 1]) on a CPU:
    deltas attach by the layers' features, and DoRA reads the dequantized weight."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    from tests.tiny import build_tiny

    overrides, sites = BNB_FAMILIES[family]
    build_tiny(family, "cls", **overrides).save_pretrained(tmp_path)
    ours, theirs = _bnb_model(str(tmp_path)), _bnb_model(str(tmp_path))
    config = {**LORA, "modified_modules": sites, "init_lora_weights": False, "use_dora": dora}
    delta = AutoDeltaModel.from_config(config, backbone_model=ours)
    delta.freeze_module()
    peft = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=16, target_modules=sites, use_dora=dora))
    names = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
             "magnitude": "lora_magnitude_vector.default.weight"}
    values = {f"base_model.model.{key.split('.lora.')[0]}.{names[key.rsplit('.', 1)[1]]}": value
              for key, value in delta.state_dict().items() if ".lora." in key}
    assert not peft.load_state_dict(values, strict=False).unexpected_keys
    lora_sites = {type(a.site).__name__ for a in delta.record.attachments if not a.mechanism.copies_backbone}
    assert lora_sites == {"Linear4bit"}
    inputs = tiny_inputs(family, batch=2, seq=8, seed=1)
    got = ours(**inputs).logits
    torch.testing.assert_close(got, peft(**inputs).logits, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    trained = {name.rsplit(".", 1)[1] for name, p in ours.named_parameters() if p.grad is not None}
    assert trained >= {"lora_A", "lora_B"}
    with pytest.raises(SiteError, match="4 bits"):
        delta.merge()
    with pytest.raises(Exception, match="bitsandbytes 4-bit weight.*full-precision checkpoint"):
        delta.merge_and_unload()


def test_a_4_bit_task_head_is_not_trained(tmp_path) -> None:
    """bitsandbytes quantizes BERT's classifier unless told not to: the delta's default copy of
    the task head would train packed codes (bitsandbytes' forward failed on the copy)."""
    pytest.importorskip("bitsandbytes")
    from deltadist.errors import ConfigError
    from tests.tiny import build_tiny

    build_tiny("bert", "cls", **BNB_FAMILIES["bert"][0]).save_pretrained(tmp_path)
    model = _bnb_model(str(tmp_path), skip=())
    with pytest.raises(ConfigError, match="classifier.weight: stored in 4 bits.*llm_int8_skip_modules"):
        AutoDeltaModel.from_config({**LORA, "modified_modules": ["query"]}, backbone_model=model)
    assert not [n for n, _ in model.named_modules() if n.endswith(".lora")]  # nothing attached
    AutoDeltaModel.from_config({**LORA, "modified_modules": ["query"], "unfrozen_modules": ["deltas"]},
                               backbone_model=model)


@pytest.fixture(scope="module")
def nf4_lm():
    """A causal Llama with NF4 projections, LoRA on them, and its twin holding the dequantized
    weights as plain parameters (what the NF4 model computes, in ordinary tensors)."""
    from tests.tiny import build_tiny

    model = build_tiny("llama", "lm", **{**WIDE, "vocab_size": 128})
    quantized.quantize_backbone(model)
    twin = build_tiny("llama", "lm", **{**WIDE, "vocab_size": 128})
    twin.load_state_dict({k: plain_values(v) for k, v in model.state_dict().items()})
    for backbone in (model, twin):
        torch.manual_seed(5)
        delta = AutoDeltaModel.from_config({**LORA, "init_lora_weights": False}, backbone_model=backbone)
        delta.freeze_module()
    return model, twin


def test_nf4_generate_checkpointing_and_deepcopy(nf4_lm) -> None:
    import copy

    model, twin = nf4_lm
    prompt = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    torch.testing.assert_close(model.generate(prompt, **settings), twin.generate(prompt, **settings))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=prompt, labels=prompt).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.gradient_checkpointing_disable()
        model.eval()
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
    copied = copy.deepcopy(model)
    assert quantized.is_quantized(copied.model.layers[1].mlp.up_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(copied(prompt).logits, model(prompt).logits, rtol=0, atol=0)


def test_nf4_model_compiles_to_the_eager_outputs(nf4_lm) -> None:
    model, _ = nf4_lm
    torch._dynamo.reset()
    prompt = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        eager = model(prompt).logits
        compiled = torch.compile(model, backend="aot_eager")(prompt).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_loading_into_nf4_seeds_the_run_as_from_pretrained_does(weights: str) -> None:
    """The job's later random draws (dropout) follow from its seed, whatever came before: with
    the generator forked instead, two runs of one NF4 job trained different deltas."""
    from transformers import AutoModelForSequenceClassification

    config = wide_llama().config
    draws = []
    for before in (1, 7):
        torch.rand(before)
        backbone_weights.load_quantized(lambda: AutoModelForSequenceClassification.from_config(config),
                                        weights, "nf4", seed=0)
        draws.append(torch.rand(4))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
