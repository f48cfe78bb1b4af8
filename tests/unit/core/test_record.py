"""The record of what a delta owns: keys, sites, and the registry of deltas on a backbone."""

from __future__ import annotations

import torch

from deltadist import BitFitModel, LoraModel
from deltadist.core.record import delta_key, kept_by_other_deltas, records_on
from tests.tiny import build_tiny


def test_keys_are_site_kind_param_and_root_sites_have_no_site_part() -> None:
    assert delta_key("bert.encoder.layer.0.attention.self.query", "lora", "lora_A") == \
        "bert.encoder.layer.0.attention.self.query.lora.lora_A"
    assert delta_key("", "soft_prompt", "embedding") == "soft_prompt.embedding"


def test_the_record_lists_delta_and_kept_parameters_by_key() -> None:
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, lora_r=2, modified_modules=["query"])
    record = delta.record
    assert delta.sites == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    assert list(record.backbone_parameters()) == ["classifier.weight", "classifier.bias"]
    # the default task head is the delta's own copy; the backbone's head is left as it was
    assert record.backbone_parameters()["classifier.weight"] is model.classifier.copy.module.weight
    assert record.kept_in_place() == ()
    assert all(record.delta_parameters()[k] is p for k, p in delta.delta_parameters().items())
    assert record.delta_parameter_ids() == {id(model.bert.encoder.layer[i].attention.self.query.lora.lora_A)
                                            for i in range(2)} | {
        id(model.bert.encoder.layer[i].attention.self.query.lora.lora_B) for i in range(2)} | {
        id(p) for p in model.classifier.copy.parameters()}


def test_records_are_known_on_their_backbone_until_unloaded() -> None:
    model = build_tiny("bert", "cls")
    lora = LoraModel(model, lora_r=2, unfrozen_modules=["deltas", "classifier.bias"])
    bitfit = BitFitModel(model, modified_modules=["attention"])
    assert set(map(id, records_on(model))) == {id(lora.record), id(bitfit.record)}
    # a bias kept without its weight is trained in place (a copy would copy the frozen weight)
    assert kept_by_other_deltas(model, bitfit.record) == {"classifier.bias"}
    with torch.no_grad():
        lora.merge_and_unload()
    assert [id(r) for r in records_on(model)] == [id(bitfit.record)]


def test_a_shared_parameter_holder_at_the_root_is_keyed_without_a_site_and_wires_no_hooks() -> None:
    """The shape later methods need: parameters shared by every site, held once at the root."""
    from torch import nn

    from deltadist.core.attach import Attachment, attach, detach
    from deltadist.core.delta_module import DeltaModule
    from deltadist.core.mechanism import HOLDER
    from deltadist.core.record import DeltaRecord
    from tests.tiny import TwoLayer

    class Holder(DeltaModule):
        def __init__(self) -> None:
            super().__init__()
            self.rule = nn.Parameter(torch.zeros(2, 2))

        def reset_parameters(self) -> None:
            nn.init.zeros_(self.rule)

    model = TwoLayer()
    holder = Attachment(site=model, site_name="", delta=Holder(), base_name="shared", mechanism=HOLDER)
    attach(holder)
    record = DeltaRecord(model, [holder])
    assert list(record.delta_parameters()) == ["shared.rule"] and record.site_names == []
    assert model.shared is holder.delta and not model._forward_hooks and not model._forward_pre_hooks
    assert "shared.rule" in model.state_dict()
    detach(holder)
    assert "shared" not in model._modules
