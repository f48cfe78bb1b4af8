"""The walkthroughs register toy extensions; each test leaves the registries as it found them."""

from __future__ import annotations

from typing import Iterator

import pytest

from deltadist.addressing.structures import STRUCTURE_MAPS
from deltadist.core.registry import DELTA_MODELS
from deltadist.engines import ENGINES


@pytest.fixture(autouse=True)
def restore_registries() -> Iterator[None]:
    saved = dict(DELTA_MODELS), dict(ENGINES), list(STRUCTURE_MAPS)
    yield
    for registry, before in zip((DELTA_MODELS, ENGINES), saved):
        registry.clear()
        registry.update(before)
    STRUCTURE_MAPS[:] = saved[2]
