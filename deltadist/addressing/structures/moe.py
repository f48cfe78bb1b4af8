"""Common-structure maps of mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE.

Attention is Llama's. The feed-forward block ``decoder.block.$.ff`` holds a router
(``ff.router``) and the experts (``ff.experts``) in one of two layouts:

* transformers 5.x: one experts module with fused 3-D parameters, ``gate_up_proj: [experts,
  2 * inner, hidden]`` (``ff.experts.w13``: gate and up, Llama's ``w1`` and ``w3``, stacked) and
  ``down_proj: [experts, hidden, inner]`` (``ff.experts.w2``); these are *parameter sites*
  (``mlp.experts.gate_up_proj``), which LoRA adapts as parameters, like PEFT's
  ``target_parameters``. The router is a module holding a ``weight: [experts, hidden]``.
* transformers 4.5x (``legacy_roles``): a list of expert MLPs with linear layers,
  ``ff.experts.$.w1`` / ``w3`` / ``w2`` (the second ``$`` is the expert's index), and a linear router.

Qwen2-MoE also has a shared expert next to the routed ones (``ff.shared_expert.w1`` / ``w3`` /
``w2``, plain linear layers) and its gate (``ff.shared_expert_gate``).
"""

from __future__ import annotations

from .base import StructureMap
from .llama import LLAMA

_ATTENTION = {real: common for real, common in LLAMA.roles.items() if ".mlp" not in real}
"""Llama's roles but its dense feed-forward block (embeddings, attention, norms, heads)."""


def _moe_roles(block: str, w1: str, w3: str, w2: str) -> dict[str, str]:
    """Roles of a sparse feed-forward block at ``layers.$.<block>`` whose expert MLPs (4.5x) name
    their projections ``w1`` (gate), ``w3`` (up) and ``w2`` (down) so."""
    return {
        f"layers.$.{block}": "decoder.block.$.ff",
        f"layers.$.{block}.gate": "decoder.block.$.ff.router",
        f"layers.$.{block}.experts": "decoder.block.$.ff.experts",
        f"layers.$.{block}.experts.$.{w1}": "decoder.block.$.ff.experts.$.w1",
        f"layers.$.{block}.experts.$.{w3}": "decoder.block.$.ff.experts.$.w3",
        f"layers.$.{block}.experts.$.{w2}": "decoder.block.$.ff.experts.$.w2",
    }


_FUSED = {
    "layers.$.mlp": "decoder.block.$.ff",
    "layers.$.mlp.gate": "decoder.block.$.ff.router",
    "layers.$.mlp.experts": "decoder.block.$.ff.experts",
    "layers.$.mlp.experts.gate_up_proj": "decoder.block.$.ff.experts.w13",
    "layers.$.mlp.experts.down_proj": "decoder.block.$.ff.experts.w2",
}
"""transformers 5.x: the fused experts' parameter sites, the same in the three families."""

MIXTRAL = StructureMap(
    family="mixtral",
    model_types=("mixtral",),
    roles={**_ATTENTION, **_FUSED},
    legacy_roles=_moe_roles("block_sparse_moe", "w1", "w3", "w2"),
)

QWEN_MOE = StructureMap(
    family="qwen_moe",
    model_types=("qwen2_moe", "qwen3_moe"),
    roles={
        **_ATTENTION, **_FUSED,
        "layers.$.mlp.shared_expert": "decoder.block.$.ff.shared_expert",
        "layers.$.mlp.shared_expert.gate_proj": "decoder.block.$.ff.shared_expert.w1",
        "layers.$.mlp.shared_expert.up_proj": "decoder.block.$.ff.shared_expert.w3",
        "layers.$.mlp.shared_expert.down_proj": "decoder.block.$.ff.shared_expert.w2",
        "layers.$.mlp.shared_expert_gate": "decoder.block.$.ff.shared_expert_gate",
    },
    legacy_roles=_moe_roles("mlp", "gate_proj", "up_proj", "down_proj"),
)
