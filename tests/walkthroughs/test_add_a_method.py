"""Walkthrough: add a method. (IA3-style output scaling, in one file, from public names only.)

A method is a config (its fields), a ``DeltaModule`` (its parameters and their initial values)
and a ``DeltaBase`` subclass that says where it goes (default roles), how it joins the call (a
mechanism) and how to build one module per site; ``@register_method`` makes ``AutoDeltaModel``
know it (a method shipped in ``deltadist/methods/`` writes it as a class decorator). Saving,
loading, freezing, detaching and engines then work without further code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deltadist import AutoDeltaConfig, AutoDeltaModel, DeltaBase, DeltaConfig, DeltaModule, register_method
from deltadist.mechanisms import AFTER


@dataclass(kw_only=True)
class ScaleConfig(DeltaConfig):
    delta_type = "toy_scale"
    init_value: float = 1.0
    """The scale every feature starts with (1: the delta starts as a no-op)."""


class Scale(DeltaModule):
    """``y * s`` for a site's output ``y: [..., features]``, ``s: [features]``."""

    def __init__(self, features: int, init_value: float, device: torch.device | None = None) -> None:
        super().__init__()
        self.init_value = init_value
        self.scale = nn.Parameter(torch.empty(features, device=device))
        self.initialize()  # skipped on meta: a 70B model on meta gets its deltas instantly

    def reset_parameters(self) -> None:
        nn.init.constant_(self.scale, self.init_value)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale


class ScaleModel(DeltaBase):
    delta_type = "toy_scale"
    config_class = ScaleConfig
    default_modified_modules = ("attn.v", "ff.w2")  # roles: every family's structure map knows them
    mechanism = AFTER  # y = delta(f(x))
    child_name = "scale"

    def _build_delta(self, site) -> DeltaModule:  # noqa: ANN001 - a deltadist Site
        out_features = site.module.weight.shape[0]  # nn.Linear: [out, in]
        return Scale(out_features, self.config.init_value, device=site.module.weight.device)


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64)
    return LlamaForCausalLM(config).eval()


def test_a_new_method_works_end_to_end(tmp_path: Path) -> None:
    register_method(ScaleModel)
    model = _tiny_llama()
    ids = torch.randint(3, 100, (2, 8))
    before = model(input_ids=ids).logits

    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict({"delta_type": "toy_scale"}), model)
    assert isinstance(delta, ScaleModel)
    assert delta.sites == [f"model.layers.{i}.{name}" for i in range(2)
                           for name in ("self_attn.v_proj", "mlp.down_proj")]
    torch.testing.assert_close(model(input_ids=ids).logits, before)  # starts as a no-op

    delta.freeze_module()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{site}.scale.scale" for site in delta.sites}
    optimizer = torch.optim.SGD(delta.parameters(), lr=0.5)
    model(input_ids=ids).logits.sum().backward()
    optimizer.step()
    after = model(input_ids=ids).logits
    assert not torch.allclose(after, before)

    delta.save_finetuned(tmp_path / "scale")
    fresh = _tiny_llama()
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "scale", backbone_model=fresh)
    assert isinstance(loaded, ScaleModel)
    torch.testing.assert_close(fresh(input_ids=ids).logits, after, rtol=0, atol=0)

    delta.detach()
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
