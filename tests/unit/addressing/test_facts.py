"""Per-family facts read from the structure maps: transposed linear classes, config attribute names."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Iterator

import pytest
import torch
from torch import nn

from deltadist import StructureMap, register_structure_map
from deltadist.addressing.facts import config_attr_names, config_value, weight_is_transposed
from deltadist.addressing.linear import is_linear_module
from deltadist.addressing.structures import STRUCTURE_MAPS
from deltadist.core.shapes import linear_features
from deltadist.engines import Engine
from deltadist.methods.prefix import kv_width
from tests.tiny import build_tiny


@pytest.fixture(autouse=True)
def restore_structure_maps() -> Iterator[None]:
    saved = list(STRUCTURE_MAPS)
    yield
    STRUCTURE_MAPS[:] = saved


class FlippedLinear(nn.Module):
    """A home-made linear layer storing its weight ``[in, out]`` (no in_features attribute)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class Attention(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.config = config


TOY = StructureMap(
    family="toy", model_types=("toy",), transposed_linear_classes=("FlippedLinear",),
    head_size_attrs=("per_head",), hidden_size_attrs=("width",),
)


def test_gpt2_conv1d_is_transposed_and_linear_is_not() -> None:
    gpt2 = build_tiny("gpt2", "base")
    conv = gpt2.h[0].attn.c_attn
    assert type(conv).__name__ == "Conv1D"
    assert weight_is_transposed(conv) and is_linear_module(conv)
    assert not weight_is_transposed(nn.Linear(2, 3))
    assert not weight_is_transposed(FlippedLinear(2, 3))


def test_a_family_registered_at_run_time_gets_its_transposed_class() -> None:
    layer = FlippedLinear(4, 6)
    assert not is_linear_module(layer)
    register_structure_map(TOY)
    assert weight_is_transposed(layer) and is_linear_module(layer)
    assert linear_features(layer, Engine()) == (4, 6)


def test_known_families_name_their_config_attributes() -> None:
    t5 = build_tiny("t5", "base").config
    assert config_attr_names(t5, "head_size_attrs") == ("d_kv",)
    assert config_value(t5, "head_size_attrs") == t5.d_kv
    assert config_value(t5, "hidden_size_attrs") == t5.d_model
    llama = build_tiny("llama", "base").config
    assert config_attr_names(llama, "head_size_attrs") == ("head_dim",)
    assert config_value(llama, "kv_heads_attrs") == llama.num_key_value_heads
    assert config_value(build_tiny("bert", "base").config, "kv_heads_attrs") is None


def test_a_config_of_no_known_family_is_asked_every_known_name() -> None:
    assert config_attr_names(None, "head_size_attrs") == ("head_dim", "d_kv")
    other = SimpleNamespace(model_type="other")
    assert config_attr_names(other, "hidden_size_attrs") == ("hidden_size", "d_model")
    assert config_value(SimpleNamespace(d_kv=8), "head_size_attrs") == 8
    assert config_value(SimpleNamespace(hidden_size=0, d_model=16), "hidden_size_attrs") == 16
    assert config_value(SimpleNamespace(head_dim=0), "head_size_attrs") is None  # as `a or b`
    assert config_value(SimpleNamespace(), "attention_heads_attrs") is None


def test_a_family_registered_at_run_time_gets_its_config_attributes() -> None:
    config = SimpleNamespace(model_type="toy", num_attention_heads=2, per_head=5, head_dim=99, width=12)
    register_structure_map(TOY)
    assert config_value(config, "head_size_attrs") == 5
    assert config_value(config, "hidden_size_attrs") == 12
    assert kv_width(Attention(config)) == 10
    assert config_attr_names(None, "head_size_attrs") == ("head_dim", "d_kv", "per_head")


def test_an_unknown_fact_is_refused() -> None:
    with pytest.raises(ValueError, match="head_size_attrs"):
        config_attr_names(None, "head_size")
