"""The method registry is the one list of methods: the test matrix runs exactly its methods."""

from __future__ import annotations

import pytest

from deltadist import AutoDeltaConfig, ConfigError
from deltadist.core.registry import DELTA_MODELS
from tests.tiny import METHODS


def test_the_test_matrix_runs_every_registered_method() -> None:
    """A new method must get a row in tests/tiny.py METHODS, or the matrix and every engine test
    would skip it without a word."""
    assert {AutoDeltaConfig.from_dict(config).delta_type for config in METHODS.values()} == set(DELTA_MODELS)
    assert set(METHODS) == set(DELTA_MODELS)


def test_an_unknown_type_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match="did you mean 'lora'.*Known delta types: adapter, bitfit"):
        AutoDeltaConfig.from_dict({"delta_type": "lorra"})
