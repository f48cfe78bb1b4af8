"""The picker page's tree: Visualization's folding as data, with every module a node stands for."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Iterator

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import deltadist
from deltadist.interactive.tree import page_tree, selectable_names
from deltadist.interactive.visualize import Visualization
from tests.tiny import build_tiny

LAYERS = 4


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node["kids"] + node["members"]:
        yield from _walk(child)


def _find(node: dict[str, Any], *names: str) -> dict[str, Any]:
    """The node reached from ``node`` through child names (folded view)."""
    for name in names:
        node = next(k for k in node["kids"] if k["name"] == name)
    return node


def test_repeated_layers_fold_into_one_node_that_stands_for_every_layer() -> None:
    model = build_tiny("bert", "cls", num_hidden_layers=LAYERS)
    tree = page_tree(model)
    layers = _find(tree, "bert", "encoder", "layer")
    (fold,) = layers["kids"]
    assert (fold["name"], fold["cls"], fold["count"]) == (f"0-{LAYERS - 1}", "BertLayer", LAYERS)
    assert fold["paths"] == [f"bert.encoder.layer.{i}" for i in range(LAYERS)]
    query = _find(fold, "attention", "self", "query")
    assert query["paths"] == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(LAYERS)]
    assert query["roles"] == [f"encoder.block.0-{LAYERS - 1}.attn.q"]
    assert query["params"] == [["weight", [32, 32], "trainable"], ["bias", [32], "trainable"]]
    # Unfolding shows each layer on its own, with one path per node.
    assert [m["name"] for m in fold["members"]] == [str(i) for i in range(LAYERS)]
    assert _find(fold["members"][2], "attention", "self", "query")["paths"] == [
        "bert.encoder.layer.2.attention.self.query"]
    assert _find(fold["members"][2], "attention", "self", "query")["roles"] == ["encoder.block.2.attn.q"]


def test_sizes_are_parameter_counts_of_one_block_and_add_up_to_the_model() -> None:
    model = build_tiny("bert", "cls", num_hidden_layers=LAYERS)
    tree = page_tree(model)
    assert tree["size"] == sum(p.numel() for p in model.parameters())
    fold = _find(tree, "bert", "encoder", "layer")["kids"][0]
    assert fold["size"] == sum(p.numel() for p in model.bert.encoder.layer[0].parameters())
    assert not tree["pick"] and all(n["pick"] for n in _walk(tree) if n is not tree)


def test_the_tree_is_the_one_visualization_draws() -> None:
    model = build_tiny("t5", "lm")
    drawn = [re.sub(r" \w+:\[[^\]]*\]", "", line.split("── ")[-1])  # labels without parameters
             for line in Visualization(model).structure_graph(printTree=False).splitlines()]
    labels = [f"{n['name']} ({n['cls']})" + (f" ×{n['count']}" if n["count"] > 1 else "")
              for n in _folded(page_tree(model))]
    assert drawn == labels


def _folded(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The folded view, depth first (members left out, as the picture does)."""
    yield node
    for child in node["kids"]:
        yield from _folded(child)


def test_deltas_are_shown_and_cannot_be_picked() -> None:
    model = build_tiny("bert", "cls", num_hidden_layers=LAYERS)
    deltadist.LoraModel(model, modified_modules=["bert.encoder.layer.0.attention.self.query"], lora_r=2)
    tree = page_tree(model)
    layer_nodes = _find(tree, "bert", "encoder", "layer")["kids"]
    assert [n["name"] for n in layer_nodes] == ["0", f"1-{LAYERS - 1}"]  # the delta splits the fold
    lora = _find(layer_nodes[0], "attention", "self", "query", "lora")
    assert lora["delta"] and not lora["pick"]
    assert {kind for _, _, kind in lora["params"]} == {"delta"}
    assert all(not n["pick"] for n in _walk(lora))
    names = selectable_names(model)
    assert "bert.encoder.layer.0.attention.self.query" in names
    assert not any(".lora" in name for name in names)


def test_selectable_names_include_modules_the_page_hides() -> None:
    model = build_tiny("llama", "lm")
    shown = {p for n in _walk(page_tree(model)) for p in n["paths"]}
    names = selectable_names(model)
    assert "model.layers.0.mlp.act_fn" in names and "model.layers.0.mlp.act_fn" not in shown
    assert shown - {""} <= set(names)


class _Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(2, 2) for _ in range(4))


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Experts() for _ in range(3))


def test_a_fold_inside_a_fold_stands_for_every_pair_of_indices() -> None:
    tree = page_tree(_Blocks())
    (outer,) = _find(tree, "blocks")["kids"]
    (inner,) = _find(outer, "experts")["kids"]
    assert (outer["count"], inner["count"], inner["name"]) == (3, 4, "0-3")
    assert inner["paths"] == [f"blocks.{b}.experts.{e}" for b in range(3) for e in range(4)]
    # Unfolding the inner fold in the folded view: expert 2 of every block.
    assert inner["members"][2]["paths"] == [f"blocks.{b}.experts.2" for b in range(3)]
    # Unfolding the outer one: block 1, whose experts are folded again.
    (inner_of_1,) = _find(outer["members"][1], "experts")["kids"]
    assert inner_of_1["paths"] == [f"blocks.1.experts.{e}" for e in range(4)]
    ids = [n["id"] for n in _walk(tree)]
    assert len(ids) == len(set(ids))


def test_a_70b_llama_on_meta_gives_a_small_folded_tree_with_logical_sizes() -> None:
    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    tree = page_tree(model)
    (fold,) = _find(tree, "model", "layers")["kids"]
    assert (fold["name"], fold["count"]) == ("0-79", 80)
    assert _find(fold, "self_attn", "q_proj")["size"] == 8192 * 8192
    assert _find(fold, "self_attn", "k_proj")["params"] == [["weight", [1024, 8192], "trainable"]]
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # a tied one would count twice
    assert tree["size"] == sum(math.prod(p.shape) for p in model.parameters())
    assert len(json.dumps(tree)) < 1_000_000  # the page gets the folded tree, not 80 copies of it drawn
