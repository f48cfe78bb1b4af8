"""The BMTrain engine on the CPU, against BMTrain's own classes.

``bmtrain`` imports without a GPU, but ``DistributedParameter(...)`` and every collective need
``bmt.init_distributed`` (CUDA, NCCL). Here each parameter is a real ``DistributedParameter``
built as BMTrain lays it out at world size 1 (its data the flattened tensor, its logical shape in
``_original_shape``), and its CUDA all-gather is replaced by the view it amounts to in a world of
one. Everything deltadist does (detection, logical shapes, adopting new delta parameters, reading
them gathered through ``DistributedModule``, save, load, merge, fingerprint) runs as on a GPU.
The pieces of a world of several ranks are tested on their arithmetic; the real thing is
``tests/distributed/test_bmtrain.py`` (CUDA only).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deltadist import AutoDeltaConfig, AutoDeltaModel
from deltadist.engines import BMTrainEngine, detect_engine
from deltadist.engines import bmtrain as bmtrain_engine
from deltadist.errors import EngineError
from tests.tiny import METHODS, build_tiny, logits_of, skip_unsupported, tiny_inputs

bmt = pytest.importorskip("bmtrain", reason="bmtrain is not installed (pip install bmtrain)")


def as_distributed(param: torch.Tensor, start: int | None = 0, piece: torch.Tensor | None = None,
                   in_block: bool = False) -> nn.Parameter:
    """A ``DistributedParameter`` holding ``piece`` (default: all of ``param``, flattened) from
    flat offset ``start``, with ``param``'s logical shape: BMTrain's layout, without CUDA."""
    data = param.detach().reshape(-1).clone() if piece is None else piece
    fake = torch.Tensor._make_subclass(bmt.DistributedParameter, data, param.requires_grad)
    for name, value in {
        "_original_shape": param.shape, "_start_partition": start,
        "_end_partition": (start or 0) + data.numel(), "_init_method": None, "_in_block": in_block,
        "_group": None, "_tp_mode": False, "_zero_comm": None, "_tp_split_dim": -1,
        "_tp_original_shape": param.shape,
    }.items():
        setattr(fake, name, value)
    return fake


@pytest.fixture
def world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """BMTrain at world size 1 on the CPU: a gather is the reshaped piece (autograd included)."""
    monkeypatch.setattr(bmt.DistributedParameter, "gather", lambda self: self.view(self._original_shape))
    monkeypatch.setitem(bmt.config, "save_param_to_cpu", True)
    monkeypatch.setitem(bmt.config, "tp_size", 1)
    monkeypatch.setattr(bmtrain_engine, "distribute", as_distributed)


def to_bmtrain(model: nn.Module) -> nn.Module:
    """What ``bmt.BMTrainModelWrapper`` does to parameters and classes (without ``Block`` s)."""
    for module in model.modules():
        owned = [k for k, p in module._parameters.items() if p is not None]
        for key in owned:
            module._parameters[key] = as_distributed(module._parameters[key])
        if owned:
            module.__class__ = bmtrain_engine.gathering_class(type(module))
    return model


def test_a_bmtrain_model_is_claimed_and_its_logical_shapes_read(world_of_one) -> None:
    plain = build_tiny("bert")
    model = to_bmtrain(copy.deepcopy(plain))
    engine = detect_engine(model)
    assert isinstance(engine, BMTrainEngine)
    assert all(p.dim() == 1 for p in model.parameters())  # the pieces are flat
    assert {n: engine.logical_shape(p) for n, p in model.named_parameters()} == \
        {n: p.shape for n, p in plain.named_parameters()}
    assert engine.model_class_name(model) == "BertForSequenceClassification"
    assert not isinstance(detect_engine(plain), BMTrainEngine)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_attaches_to_a_bmtrain_model_as_to_the_plain_one(world_of_one, method) -> None:
    skip_unsupported("bert", method)
    config = AutoDeltaConfig.from_dict(METHODS[method])
    plain, model = build_tiny("bert"), to_bmtrain(build_tiny("bert"))
    torch.manual_seed(0)
    plain_delta = AutoDeltaModel.from_config(config, backbone_model=plain)
    torch.manual_seed(0)
    delta = AutoDeltaModel.from_config(config, backbone_model=model)

    params = dict(delta.named_parameters())
    assert params and all(isinstance(p, bmt.DistributedParameter) for p in params.values())
    engine = delta.engine
    assert {k: engine.logical_shape(p) for k, p in params.items()} == \
        {k: p.shape for k, p in plain_delta.named_parameters()}
    if method != "bitfit":  # BitFit's biases are backbone-shaped and built the same way
        assert any(p.dim() > 1 for p in plain_delta.parameters())
        assert all(p.dim() == 1 for p in params.values())
    inputs = tiny_inputs("bert")
    torch.testing.assert_close(logits_of(model, inputs), logits_of(plain, inputs), rtol=0, atol=0)


def test_the_delta_trains_saves_and_reloads_as_in_plain_torch(world_of_one, tmp_path) -> None:
    config = AutoDeltaConfig.from_dict(METHODS["lora"])
    plain, model = build_tiny("bert"), to_bmtrain(build_tiny("bert"))
    inputs, labels = tiny_inputs("bert"), torch.tensor([0, 2])
    for backbone in (plain, model):
        torch.manual_seed(0)
        delta = AutoDeltaModel.from_config(config, backbone_model=backbone)
        delta.freeze_module()
        optimizer = torch.optim.SGD(delta.parameters(), lr=0.5)
        for _ in range(2):
            nn.functional.cross_entropy(logits_of(backbone, inputs), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
        delta.save_finetuned(tmp_path / ("bmtrain" if backbone is model else "plain"))
    trained = logits_of(model, inputs)
    torch.testing.assert_close(trained, logits_of(plain, inputs))

    saved = AutoDeltaModel.from_finetuned(tmp_path / "bmtrain", backbone_model=build_tiny("bert"))
    reference = AutoDeltaModel.from_finetuned(tmp_path / "plain", backbone_model=build_tiny("bert"))
    for (key, value), (ref_key, ref) in zip(saved.state_dict().items(), reference.state_dict().items()):
        assert key == ref_key and value.shape == ref.shape  # full shapes, the same keys
        torch.testing.assert_close(value, ref)
    torch.testing.assert_close(logits_of(saved.backbone_model, inputs), trained)

    # from_finetuned onto a BMTrain model scatters the full tensors back into the pieces.
    again = to_bmtrain(build_tiny("bert"))
    AutoDeltaModel.from_finetuned(tmp_path / "bmtrain", backbone_model=again)
    torch.testing.assert_close(logits_of(again, inputs), trained)


def test_a_merge_lands_in_the_distributed_weights(world_of_one) -> None:
    model = to_bmtrain(build_tiny("bert"))
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(METHODS["lora"]), backbone_model=model)
    with torch.no_grad():
        for param in delta.parameters():
            param.add_(0.1)
    inputs = tiny_inputs("bert")
    unmerged = logits_of(model, inputs)
    query = model.bert.encoder.layer[0].attention.self.query.weight  # gathered: full shape
    before = query.detach().clone()
    delta.merge()
    assert not torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, before)
    torch.testing.assert_close(logits_of(model, inputs), unmerged, rtol=1e-5, atol=1e-5)


def test_the_pieces_of_several_ranks_add_up_to_the_logical_tensor() -> None:
    """Rank r holds flat elements [start_r, start_r + n_r): placed and summed they are the tensor;
    a full value is split back the same way; a rank with an empty piece (inside a ``Block``,
    ``_start_partition`` is ``None``) contributes nothing."""
    full = torch.arange(15.0).reshape(3, 5)
    ranks = [as_distributed(full, 0, full.reshape(-1)[:8].clone()),
             as_distributed(full, 8, full.reshape(-1)[8:].clone(), in_block=True),
             as_distributed(full, None, torch.empty(0), in_block=True)]
    total = sum(bmtrain_engine.place_piece(p) for p in ranks)
    assert torch.equal(total.view(3, 5), full)
    new = -full
    assert [bmtrain_engine.own_piece(p, new).tolist() for p in ranks] == \
        [new.reshape(-1)[:8].tolist(), new.reshape(-1)[8:].tolist(), []]


def test_tensor_parallel_bmtrain_models_are_refused_with_the_fix(world_of_one) -> None:
    model = to_bmtrain(build_tiny("bert"))
    next(model.parameters())._tp_mode = True
    with pytest.raises(EngineError, match="tp_size=1"):
        detect_engine(model)


def test_detach_and_attach_on_a_bmtrain_model_and_its_whole_state_dict(world_of_one) -> None:
    plain, model = build_tiny("bert"), to_bmtrain(build_tiny("bert"))
    inputs = tiny_inputs("bert")
    config = AutoDeltaConfig.from_dict({**METHODS["adapter"], "unfrozen_modules": ["deltas"]})
    delta = AutoDeltaModel.from_config(config, backbone_model=model)
    with torch.no_grad():
        for param in delta.parameters():
            param.add_(0.1)
    attached = logits_of(model, inputs)
    # DistributedModule's state-dict hooks gather: the model's own state_dict has full shapes.
    whole = model.state_dict()
    assert {k: v.shape for k, v in delta.state_dict().items()} == \
        {k: whole[k].shape for k in delta.state_dict()}
    delta.detach()
    torch.testing.assert_close(logits_of(model, inputs), logits_of(plain, inputs), rtol=0, atol=0)
    delta.attach()
    torch.testing.assert_close(logits_of(model, inputs), attached, rtol=0, atol=0)


def test_engine_bmtrain_without_cuda_is_a_config_error_naming_the_alternatives(monkeypatch) -> None:
    from deltadist.engines import setup_engine
    from deltadist.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs CUDA GPUs.*ddp, fsdp2, fsdp1 or deepspeed"):
        setup_engine("bmtrain", environ={})
