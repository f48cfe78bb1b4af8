"""Common-structure maps checked against real tiny models of every family."""

from __future__ import annotations

import re
from functools import cache

import pytest
import torch
from torch import nn

import transformers

from deltadist.addressing.common import modules_with_role
from deltadist.addressing.structures import STRUCTURE_MAPS, TASK_HEAD, VISION_SEQUENCE, StructureMap
from tests.tiny import FAMILIES, MOE_FAMILIES, build_tiny, has_head, logits_of, tiny_inputs

NUM_LAYERS = 2
ENCODER_DECODER = {"t5", "bart"}
DECODER_ONLY = {"gpt2", "llama", "qwen2", "mistral"}
LINEAR_ROLES = ("attn.q", "attn.v", "attn.proj", "ff.w1", "ff.w2")
ATTN_ROLES = ("", ".q", ".k", ".v", ".proj", ".layer_norm")
FF_ROLES = ("ff", "ff.w1", "ff.w2", "ff.w3", "ff.layer_norm")
MOE_ROLES = ("ff.router", "ff.experts", "ff.experts.w13", "ff.experts.w2", "ff.experts.$.w1",
             "ff.experts.$.w3", "ff.experts.$.w2", "ff.shared_expert", "ff.shared_expert.w1",
             "ff.shared_expert.w3", "ff.shared_expert.w2", "ff.shared_expert_gate")
BLOCK_ROLES = ({f"{a}{part}" for a in ("attn", "crossattn") for part in ATTN_ROLES}
               | set(FF_ROLES) | set(MOE_ROLES))
COMMON_TEMPLATES = {"embeddings", "lm_head.proj", TASK_HEAD, VISION_SEQUENCE} | {
    f"{side}.block.$.{role}" for side in ("encoder", "decoder") for role in BLOCK_ROLES
}
VARIANTS: dict[str, tuple[dict[str, str], ...]] = {"t5": ({}, {"feed_forward_proj": "gated-gelu"})}
"""Config overrides built on top of the defaults: T5 v1.1 (gated ``wi_0``/``wi_1``)."""


class Wrapped(nn.Module):
    """A user module holding the model under ``inner``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs: torch.Tensor) -> object:
        return self.inner(**kwargs)


@cache
def _tiny(family: str, head: str = "cls", overrides: tuple[tuple[str, str], ...] = ()) -> nn.Module:
    return build_tiny(family, head, **dict(overrides))


def _all_tiny(family: str) -> list[nn.Module]:
    """Every head and config variant of ``family``."""
    return [
        _tiny(family, head, tuple(sorted(overrides.items())))
        for head in ("base", "cls", "qa", "token", "lm")
        if has_head(family, head)
        for overrides in VARIANTS.get(family, ({},))
    ]


def map_for(family: str) -> StructureMap:
    """The one structure map serving ``family`` as a ``config.model_type``."""
    (structure,) = [s for s in STRUCTURE_MAPS if family in s.model_types]
    return structure


def resolve(
    model: nn.Module, structure: StructureMap, role: str
) -> dict[str, tuple[str, nn.Module]]:
    """Common name -> (real name, module) for modules whose common name ends with ``role``."""
    found: dict[str, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        for common in structure.common_names(name):
            if common == role or common.endswith("." + role):
                assert common not in found, f"{common} is played by {found[common][0]} and {name}"
                found[common] = (name, module)
    return found


def expected_blocks(family: str, role: str) -> set[str]:
    sides = ["encoder", "decoder"] if family in ENCODER_DECODER else []
    sides = sides or (["decoder"] if family in DECODER_ONLY else ["encoder"])
    return {f"{side}.block.{i}.{role}" for side in sides for i in range(NUM_LAYERS)}


def _layer_index(name: str) -> str:
    return re.search(r"(?:^|\.)(\d+)(?:\.|$)", name).group(1)


def test_every_family_has_exactly_one_map() -> None:
    model_types = [t for s in STRUCTURE_MAPS for t in s.model_types]
    assert len(model_types) == len(set(model_types))
    assert set(FAMILIES) <= set(model_types)


@pytest.mark.parametrize("structure", STRUCTURE_MAPS, ids=lambda s: s.family)
def test_common_names_use_the_common_vocabulary(structure: StructureMap) -> None:
    for real, common in structure.roles.items():
        commons = (common,) if isinstance(common, str) else common
        assert set(commons) <= COMMON_TEMPLATES, real
        assert real.count("$") == next(iter(commons)).count("$"), real
    for real, common in structure.legacy_roles.items():
        commons = (common,) if isinstance(common, str) else common
        assert set(commons) <= COMMON_TEMPLATES, real


TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


@pytest.mark.parametrize("structure", STRUCTURE_MAPS, ids=lambda s: s.family)
def test_no_dead_templates(structure: StructureMap) -> None:
    # Modules and parameters (fused experts are parameter sites: ``mlp.experts.gate_up_proj``).
    names = {n for t in structure.model_types for m in _all_tiny(t)
             for n in [*(n for n, _ in m.named_modules()), *(n for n, _ in m.named_parameters())]}
    # `roles` are written against transformers 5 paths; `legacy_roles` against 4.5x ones.
    templates = structure.roles if TRANSFORMERS_5 else structure.legacy_roles
    for real, common in templates.items():
        single = StructureMap(structure.family, structure.model_types, {real: common})
        assert any(single.common_names(n) for n in names), f"{real} matches no module"


MOE_LAYOUT = {
    # family: the 4.5x sparse block holding the expert modules
    "mixtral": "block_sparse_moe",
    "qwen2_moe": "mlp",
    "qwen3_moe": "mlp",
}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_roles_resolve_in_this_transformers(family: str) -> None:
    """Fused experts (5.x) are parameter sites ``ff.experts.w13`` / ``w2``; expert modules (4.5x)
    give ``ff.experts.$.w1`` / ``w3`` / ``w2`` per expert; both have ``ff.router`` per layer."""
    model = _tiny(family, "lm")
    structure = map_for(family)
    names = [*(n for n, _ in model.named_modules()), *(n for n, _ in model.named_parameters())]
    found = {c: n for n in names for c in structure.common_names(n)}
    for i in range(NUM_LAYERS):
        assert f"decoder.block.{i}.ff.router" in found
        assert f"decoder.block.{i}.attn.q" in found
        if TRANSFORMERS_5:
            assert found[f"decoder.block.{i}.ff.experts.w13"] == f"model.layers.{i}.mlp.experts.gate_up_proj"
            assert found[f"decoder.block.{i}.ff.experts.w2"] == f"model.layers.{i}.mlp.experts.down_proj"
        else:
            block = MOE_LAYOUT[family]
            for e in range(4):
                assert found[f"decoder.block.{i}.ff.experts.{e}.w2"].startswith(
                    f"model.layers.{i}.{block}.experts.{e}.")
        assert (f"decoder.block.{i}.ff.shared_expert.w1" in found) == (family == "qwen2_moe")


def test_llama_qwen2_mistral_share_module_paths() -> None:
    paths = {
        f: [n for n, _ in _tiny(f, "lm").named_modules()] for f in ("llama", "qwen2", "mistral")
    }
    assert paths["qwen2"] == paths["llama"] == paths["mistral"]


@pytest.mark.parametrize("role", (*LINEAR_ROLES, "attn.layer_norm"))
@pytest.mark.parametrize("family", FAMILIES)
def test_roles_resolve_one_per_layer(family: str, role: str) -> None:
    found = resolve(_tiny(family), map_for(family), role)
    assert set(found) == expected_blocks(family, role)
    for common, (name, module) in found.items():
        assert _layer_index(name) == _layer_index(common), (common, name)
        kind = type(module).__name__
        if role.endswith("layer_norm"):
            assert "Norm" in kind, (name, kind)
        else:
            assert isinstance(module, nn.Linear) or kind == "Conv1D", (name, kind)


@pytest.mark.parametrize("family", sorted(ENCODER_DECODER))
def test_cross_attention_resolves(family: str) -> None:
    for role in ("crossattn.q", "crossattn.k", "crossattn.v", "crossattn.proj"):
        found = resolve(_tiny(family), map_for(family), role)
        assert set(found) == {f"decoder.block.{i}.{role}" for i in range(NUM_LAYERS)}
        assert all(isinstance(m, nn.Linear) for _, m in found.values())


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("llama", ()), ("qwen2", ()), ("mistral", ()), ("t5", (("feed_forward_proj", "gated-gelu"),))],
    ids=["llama", "qwen2", "mistral", "t5-v1.1"],
)
def test_gated_mlp_up_projection_is_w3(family: str, overrides: tuple[tuple[str, str], ...]) -> None:
    model = _tiny(family, "cls", overrides)
    found = resolve(model, map_for(family), "ff.w3")
    assert set(found) == expected_blocks(family, "ff.w3")
    w1 = {name for name, _ in resolve(model, map_for(family), "ff.w1").values()}
    assert w1.isdisjoint(name for name, _ in found.values())


def test_gpt2_fused_c_attn_is_q_k_and_v() -> None:
    names = map_for("gpt2").common_names("transformer.h.1.attn.c_attn")
    assert names == ("decoder.block.1.attn.q", "decoder.block.1.attn.k", "decoder.block.1.attn.v")


@pytest.mark.parametrize("family", [f for f in FAMILIES if has_head(f, "lm")])
def test_lm_head_proj_resolves(family: str) -> None:
    model = _tiny(family, "lm")
    found = resolve(model, map_for(family), "lm_head.proj")
    assert list(found) == ["lm_head.proj"]
    (module,) = [m for _, m in found.values()]
    assert isinstance(module, nn.Linear) and module.out_features == model.config.vocab_size


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_is_the_module_forward_runs(family: str) -> None:
    if not TRANSFORMERS_5 and family in ("t5", "bart"):
        pytest.skip("transformers 4.5x lists the shared embedding once, as `shared`; not mapped")
    model = _tiny(family)
    ((name, module),) = resolve(model, map_for(family), "embeddings").values()
    calls: list[str] = []
    handle = module.register_forward_hook(lambda *_: calls.append(name))
    try:
        with torch.no_grad():
            logits_of(model, tiny_inputs(family))
    finally:
        handle.remove()
    assert calls, f"{name} never runs in forward"


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapped_model_resolves_the_same_modules(family: str) -> None:
    structure, model = map_for(family), _tiny(family, "base")
    wrapped = Wrapped(Wrapped(model))
    for role in sorted(BLOCK_ROLES | {"embeddings"}):
        plain = {c: m for c, (_, m) in resolve(model, structure, role).items()}
        inner = resolve(wrapped, structure, role)
        assert plain or role not in LINEAR_ROLES, role
        assert all(name.startswith("inner.inner.") for name, _ in inner.values())
        assert {c: m for c, (_, m) in inner.items()} == plain, role


@pytest.mark.parametrize("family", FAMILIES)
def test_names_playing_no_role_have_no_common_names(family: str) -> None:
    structure, model = map_for(family), _tiny(family)
    for name in ("", "dense", "pooler.dense", "layer.0", "inner"):
        assert structure.common_names(name) == (), name
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) or name.endswith(("act", "act_fn", "activation")):
            assert structure.common_names(name) == (), name
        if structure.common_names(name):  # a delta module injected under a role plays none itself
            assert structure.common_names(f"{name}.lora_A") == (), name


TASK_HEADS = {  # the new, randomly initialised modules of each task model, by head
    "cls": {"bert": ["classifier"], "roberta": ["classifier"], "distilbert": ["pre_classifier", "classifier"],
            "t5": ["classification_head"], "gpt2": ["score"], "bart": ["classification_head"],
            "llama": ["score"], "qwen2": ["score"], "mistral": ["score"], "vit": ["classifier"]},
    "qa": {family: ["qa_outputs"] for family in FAMILIES},
    "token": {family: ["classifier"] for family in FAMILIES}
    | {family: ["score"] for family in ("llama", "qwen2", "mistral")},
    "lm": {family: [] for family in FAMILIES},
}


@pytest.mark.parametrize("head", list(TASK_HEADS))
@pytest.mark.parametrize("family", FAMILIES)
def test_task_heads_are_found_by_role(family: str, head: str) -> None:
    if not has_head(family, head):
        pytest.skip(f"transformers has no {head} model for {family}")
    model = _tiny(family, head)
    assert modules_with_role(model, TASK_HEAD) == TASK_HEADS[head][family]
    assert modules_with_role(Wrapped(model), TASK_HEAD) == [f"inner.{n}" for n in TASK_HEADS[head][family]]


def test_a_plain_module_gets_no_guessed_task_head() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.classifier = nn.Linear(4, 4), nn.Linear(4, 2)

    assert modules_with_role(Plain(), TASK_HEAD, guess=False) == []
