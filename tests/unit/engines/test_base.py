"""The plain engine: what every step asks of an engine, in one process."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltadist.engines import Engine, detect_engine, record_logical_shapes, recorded_shape
from deltadist.engines.base import TensorSource


def test_one_process_is_the_plain_engine() -> None:
    engine = detect_engine(nn.Linear(2, 2))
    assert type(engine) is Engine and engine.name == "plain"
    assert (engine.rank, engine.world_size, engine.is_main) == (0, 1, True)


def test_gather_returns_cpu_copies_and_scatter_writes_in_place() -> None:
    param = nn.Parameter(torch.arange(6.0).reshape(2, 3))
    gathered = Engine().gather({"p": param})["p"]
    assert torch.equal(gathered, param)
    assert gathered.untyped_storage().data_ptr() != param.untyped_storage().data_ptr()  # a copy
    Engine().scatter(param, torch.ones(2, 3, dtype=torch.float64))
    assert torch.equal(param, torch.ones(2, 3)) and param.dtype == torch.float32


def test_load_reads_a_tensor_source_and_sample_reads_flat_positions() -> None:
    param = nn.Parameter(torch.zeros(4, 2))
    source = TensorSource(full=lambda: torch.arange(8.0).reshape(4, 2), rows=lambda a, b: None)
    Engine().load(param, source)
    values = Engine().sample(param, torch.tensor([0, 3, 7]))
    assert values.tolist() == [0.0, 3.0, 7.0] and values.dtype == torch.float64
    with torch.device("meta"):
        assert Engine().sample(nn.Parameter(torch.empty(2)), torch.tensor([0])) is None


def test_broadcast_outcome_in_one_process_reraises_the_error() -> None:
    Engine().broadcast_outcome(None, "writing")
    with pytest.raises(OSError, match="disk full"):
        Engine().broadcast_outcome(OSError("disk full"), "writing")


def test_logical_shapes_recorded_before_wrapping_stay_on_the_parameter() -> None:
    model = nn.Linear(3, 5)
    record_logical_shapes(model, Engine())
    model.weight.data = torch.empty(0)  # what a sharding engine leaves locally
    assert recorded_shape(model.weight) == torch.Size([5, 3])
