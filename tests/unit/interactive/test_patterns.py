"""Shortest patterns: what they return for typical selections, and exact round trips for random ones."""

from __future__ import annotations

import random
import re

import pytest

from deltadist.addressing.select import select_sites
from deltadist.errors import AddressingError
from deltadist.interactive.patterns import _digit_alternatives, shortest_patterns
from deltadist.interactive.tree import selectable_names
from tests.tiny import build_tiny

LAYERS = 12


@pytest.fixture(scope="module")
def llama():
    model = build_tiny("llama", "lm", num_hidden_layers=LAYERS)
    return model, selectable_names(model)


def _layers(module: str, indices) -> list[str]:
    return [f"model.layers.{i}.{module}" for i in indices]


def test_a_module_in_every_layer_is_its_name(llama) -> None:
    _, names = llama
    chosen = _layers("self_attn.q_proj", range(LAYERS)) + _layers("self_attn.v_proj", range(LAYERS))
    assert shortest_patterns(chosen, names) == ["q_proj", "v_proj"]


def test_some_layers_are_a_regex_over_their_indices(llama) -> None:
    _, names = llama
    chosen = _layers("self_attn.q_proj", range(6)) + _layers("mlp.down_proj", range(LAYERS - 1))
    assert shortest_patterns(chosen, names) == [
        r"[r][0-5]\.self_attn\.q_proj", r"[r](?:[0-9]|10)\.mlp\.down_proj"]


def test_regexes_that_differ_in_the_last_name_are_joined(llama) -> None:
    _, names = llama
    projections = ["q_proj", "k_proj", "v_proj", "o_proj"]
    chosen = [n for p in projections for n in _layers(f"self_attn.{p}", range(LAYERS - 1))]
    joined = r"[r](?:[0-9]|10)\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
    assert shortest_patterns(chosen, names) == [joined]


def test_one_module_is_its_shortest_unique_ending(llama) -> None:
    _, names = llama
    assert shortest_patterns(["model.layers.3.mlp"], names) == ["3.mlp"]
    assert shortest_patterns(["model.norm"], names) == ["norm"]
    assert shortest_patterns(["model"], names) == ["model"]
    bert = selectable_names(build_tiny("bert", "cls"))
    assert shortest_patterns(["bert.embeddings.LayerNorm"], bert) == ["embeddings.LayerNorm"]  # not every


def test_context_is_added_where_encoder_and_decoder_share_names() -> None:
    model = build_tiny("t5", "lm")
    names = selectable_names(model)
    chosen = [f"encoder.block.{i}.layer.0.SelfAttention.q" for i in range(2)]
    both = chosen + [f"decoder.block.{i}.layer.0.SelfAttention.q" for i in range(2)]
    assert shortest_patterns(both, names) == ["SelfAttention.q"]
    patterns = shortest_patterns(chosen, names)
    assert patterns == [r"[r]encoder\.block\.[01]\.layer\.0\.SelfAttention\.q"]  # not the decoder's
    assert {s.name for s in select_sites(model, patterns, ())} == set(chosen)


def test_bad_choices_say_what_to_do(llama) -> None:
    _, names = llama
    with pytest.raises(AddressingError, match="No module is selected"):
        shortest_patterns([], names)
    with pytest.raises(AddressingError, match="not modules that can be modified.*lora"):
        shortest_patterns(["model.layers.0.self_attn.q_proj.lora"], names)
    nested = ["a", "a.b", "x", "x.a", "x.a.b"]
    with pytest.raises(AddressingError, match="'a.b' cannot be selected without x.a.b"):
        shortest_patterns(["a.b"], nested)


@pytest.mark.parametrize("values", [{"0"}, {"0", "1"}, {"1", "3", "10", "11", "12", "30", "100"},
                                    {str(i) for i in range(80)}, {str(i) for i in range(79)}])
def test_index_alternatives_match_exactly_the_indices(values: set[str]) -> None:
    regex = re.compile(_digit_alternatives(values))
    assert {str(i) for i in range(1000) if regex.fullmatch(str(i))} == values


def test_random_index_sets_round_trip() -> None:
    rng = random.Random(0)
    for _ in range(300):
        values = {str(i) for i in rng.sample(range(150), rng.randint(1, 40))}
        regex = re.compile(_digit_alternatives(values))
        assert {str(i) for i in range(1000) if regex.fullmatch(str(i))} == values


@pytest.mark.parametrize("family", ["llama", "t5", "bert", "bart"])
def test_random_selections_round_trip_through_select_sites(family: str) -> None:
    """Patterns select exactly the choice, as the attach's own selection code sees it."""
    layers = {"llama": {"num_hidden_layers": LAYERS}, "t5": {"num_layers": 3, "num_decoder_layers": 3}}
    model = build_tiny(family, "cls" if family == "bert" else "lm", **layers.get(family, {}))
    names = selectable_names(model)
    columns = _columns(names)
    rng = random.Random(family)
    for trial in range(60):
        if trial % 2:  # a few whole or partial columns: what users pick
            chosen = {n for column in rng.sample(columns, rng.randint(1, 4))
                      for n in rng.sample(column, rng.randint(1, len(column)))}
        else:  # anything at all
            chosen = set(rng.sample(names, rng.randint(1, len(names) // 2)))
        try:
            patterns = shortest_patterns(chosen, names)
        except AddressingError as err:  # only the one impossible case: a name ending another name
            assert "cannot be selected without" in str(err)
            continue
        assert {s.name for s in select_sites(model, patterns, ())} == chosen, patterns
        assert len(patterns) <= len(chosen)


def _columns(names: list[str]) -> list[list[str]]:
    """Names equal up to their integer segments (one module across layers)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(re.sub(r"(?<=\.)\d+(?=\.|$)", "$", name), []).append(name)
    return [group for group in groups.values() if len(group) > 1]
