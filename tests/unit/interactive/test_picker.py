"""``interactive_modify`` without a browser: the page's API driven with urllib, as the page drives it."""

from __future__ import annotations

import _thread
import re
import threading
import urllib.error
import urllib.request

import pytest
import torch

import deltadist
from deltadist import AutoDeltaModel, BitFitModel, LoraModel, SoftPromptModel
from deltadist.errors import ConfigError, InteractiveError
from deltadist.interactive.picker import DEFAULT_PORT, patterns_for, picker_port
from tests.picking import picking
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import build_tiny

pytestmark = pytest.mark.timeout(120)
LAYERS = 4
QUERY = [f"model.layers.{i}.self_attn.q_proj" for i in range(LAYERS)]


@pytest.fixture
def llama():
    return build_tiny("llama", "lm", num_hidden_layers=LAYERS)


def test_a_submitted_selection_becomes_the_delta_and_is_printed(llama) -> None:
    with picking(lambda: LoraModel(llama, interactive_modify=0, interactive_timeout=60, lora_r=2)) as run:
        tree = run.tree()
        assert tree["title"] == "LoraModel on LlamaForCausalLM" and not tree["broadcast"]
        assert tree["initial"] == []  # nothing typed: nothing preselected
        defaults = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(LAYERS) for p in "qv"]
        assert tree["defaults"] == defaults  # LoRA's: attn.q and attn.v
        reply = run.submit(QUERY[:3])
        assert reply == {"ok": True, "patterns": [r"[r][0-2]\.self_attn\.q_proj"]}
        delta = run.result()
    assert delta.sites == QUERY[:3]
    assert delta.config.modified_modules == [r"[r][0-2]\.self_attn\.q_proj"]
    assert deltadist.deltas_on(llama) == {delta.name: delta}
    assert "modified_modules: ['[r][0-2]\\\\.self_attn\\\\.q_proj']" in run.printed.getvalue()
    _assert_closed(run.url)  # the call returned: nothing listens any more


def _assert_closed(url: str) -> None:
    with pytest.raises(urllib.error.URLError, match="refused"):
        urllib.request.urlopen(url, timeout=5)


def test_a_selection_the_method_cannot_modify_is_an_error_on_the_page_and_nothing_is_attached(llama) -> None:
    before = snapshot(llama)
    with picking(lambda: LoraModel(llama, interactive_modify=0, interactive_timeout=60)) as run:
        reply = run.submit(["model.layers.0.input_layernorm", QUERY[0]])
        assert not reply["ok"]
        assert "LoRA needs a linear layer" in reply["error"] and "input_layernorm" in reply["error"]
        assert_same_snapshot(before, snapshot(llama))  # refused: nothing attached while waiting
        assert deltadist.deltas_on(llama) == {}
        unknown = run.submit(["model.layers.9.mlp"])
        assert not unknown["ok"] and "not modules that can be modified" in unknown["error"]
        assert not run.submit([])["ok"]
        assert run.submit(QUERY)["ok"]  # fixed: accepted
        delta = run.result()
    assert delta.sites == QUERY and delta.config.modified_modules == ["q_proj"]


def test_a_timeout_leaves_the_backbone_untouched_and_says_so(llama) -> None:
    before = snapshot(llama)
    with picking(lambda: LoraModel(llama, interactive_modify=0, interactive_timeout=0.5)) as run:
        url = run.url
        with pytest.raises(InteractiveError, match=r"within 0\.5 s.*nothing was attached.*unchanged"):
            run.result()
    assert_same_snapshot(before, snapshot(llama))
    assert deltadist.deltas_on(llama) == {}
    _assert_closed(url)


def test_ctrl_c_leaves_the_backbone_untouched_and_says_so(llama, capsys) -> None:
    before = snapshot(llama)
    # Ctrl-C lands on the main thread, where the call waits (this one runs there).
    timer = threading.Timer(1.0, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt, match="cancelled.*nothing was attached.*unchanged"):
            LoraModel(llama, interactive_modify=0, interactive_timeout=60)
    finally:
        timer.cancel()
    url = re.search(r"http://\S+", capsys.readouterr().out).group(0)
    assert_same_snapshot(before, snapshot(llama))
    assert deltadist.deltas_on(llama) == {}
    _assert_closed(url)


def test_typed_patterns_are_preselected_and_the_picked_ones_replace_them(llama) -> None:
    call = lambda: AutoDeltaModel.from_config(  # noqa: E731
        {"delta_type": "lora", "modified_modules": ["q_proj"], "exclude_modules": ["layers.0"]},
        backbone_model=llama, interactive_modify=0, interactive_timeout=60)
    with picking(call) as run:
        assert run.tree()["initial"] == QUERY[1:]  # what the typed patterns select
        assert run.submit(QUERY[:1])["ok"]
        delta = run.result()
    # The selection is exact: it replaces modified_modules, exclude_modules and common_structure.
    assert delta.sites == QUERY[:1] and delta.config.exclude_modules is None


def test_a_broadcasting_method_selects_subtrees(llama) -> None:
    attention = "model.layers.1.self_attn"
    with picking(lambda: BitFitModel(llama, interactive_modify=0, interactive_timeout=60)) as run:
        assert run.tree()["broadcast"]
        reply = run.submit([attention, attention + ".q_proj"])  # the inner one is implied
        assert reply == {"ok": True, "patterns": ["1.self_attn"]}
        delta = run.result()
    assert delta.sites and all(site.startswith(attention + ".") for site in delta.sites)


def test_patterns_for_a_broadcasting_method_name_the_outermost_modules(llama) -> None:
    assert patterns_for(llama, ["model.layers.0.mlp", "model.layers.0.mlp.up_proj"], broadcast=True) \
        == ["0.mlp"]
    assert patterns_for(llama, ["model.layers.0.mlp", "model.layers.0.mlp.up_proj"]) \
        == ["0.mlp", "0.mlp.up_proj"]


def test_a_second_delta_cannot_pick_the_first_ones_modules(llama) -> None:
    first = LoraModel(llama, modified_modules=["q_proj"], delta_name="first")
    with picking(lambda: LoraModel(llama, interactive_modify=0, interactive_timeout=60)) as run:
        reply = run.submit(["model.layers.0.self_attn.q_proj.lora"])
        assert not reply["ok"] and "not modules that can be modified" in reply["error"]
        assert run.submit(["model.layers.0.self_attn.v_proj"])["ok"]
        second = run.result()
    assert deltadist.deltas_on(llama) == {"first": first, second.name: second}


@pytest.mark.parametrize(("value", "port"), [(False, None), (None, None), (True, DEFAULT_PORT), (0, 0),
                                             (9000, 9000)])
def test_interactive_modify_values(value, port) -> None:
    assert picker_port(value) == port


@pytest.mark.parametrize("value", [-1, 70000, "yes", 1.5])
def test_bad_interactive_modify_values_are_refused(llama, value) -> None:
    with pytest.raises(ConfigError, match="interactive_modify must be True"):
        LoraModel(llama, interactive_modify=value)


def test_a_method_that_takes_no_modules_refuses_before_serving(llama, capsys) -> None:
    with pytest.raises(ConfigError, match="modified_modules"):
        SoftPromptModel(llama, interactive_modify=0)
    assert "http://" not in capsys.readouterr().out


def test_a_backbone_on_meta_gets_its_delta_on_meta() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=80, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    chosen = [f"model.layers.{i}.mlp.down_proj" for i in range(40)]
    with picking(lambda: LoraModel(model, interactive_modify=0, interactive_timeout=60)) as run:
        assert run.tree()["tree"]["kids"][0]["kids"][1]["kids"][0]["count"] == 80  # model.layers.0-79
        assert run.submit(chosen) == {"ok": True, "patterns": [r"[r](?:[0-9]|[1-3][0-9])\.mlp\.down_proj"]}
        delta = run.result()
    assert delta.sites == chosen and all(p.is_meta for p in delta.parameters())
