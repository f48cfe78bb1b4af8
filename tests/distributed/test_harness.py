"""The process launcher itself: results per rank, failures with tracebacks, and no hang ever."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from tests.distributed import workers
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.distributed


def test_every_rank_runs_in_its_own_gloo_group_and_returns_its_value() -> None:
    results = run_ranks(workers.report_setup, world_size=2, timeout=120)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["world_size"] == 2 and r["backend"] == "gloo"
        assert r["omp"] == "1" and r["threads"] == 1
        assert r["engine"] == "ddp"  # deltadist sees the process group
        assert r["sum"] == 3.0  # all_reduce of 1 + 2 went through
    assert not multiprocessing.active_children()


def test_a_failing_rank_is_reported_with_its_traceback_and_the_others_are_stopped() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_ranks(workers.raise_on_rank_one, world_size=2, timeout=120)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "raise_on_rank_one failed on 1 of 2 ranks" in message
    assert "---- rank 1 ----" in message and "---- rank 0 ----" not in message
    assert "Traceback (most recent call last)" in message
    assert "_fail_deep_inside" in message and "ValueError: boom on rank 1" in message
    # Rank 0 was blocked in a barrier: it was stopped at once, not at the deadline.
    assert elapsed < 60, elapsed
    assert not multiprocessing.active_children()


def test_a_rank_that_crashes_in_native_code_is_reported_with_its_stack() -> None:
    with pytest.raises(AssertionError) as info:
        run_ranks(workers.crash_on_rank_one, world_size=2, timeout=120)
    message = str(info.value)
    assert "---- rank 1 ----" in message and "---- rank 0 ----" not in message
    assert "rank 1 exited (exit code -11) without reporting a result" in message
    assert "Segmentation fault" in message and "in crash_on_rank_one" in message
    assert not multiprocessing.active_children()


def test_a_hanging_rank_is_killed_at_the_deadline() -> None:
    timeout = 20
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_ranks(workers.hang_on_rank_one, world_size=2, timeout=timeout)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "hang_on_rank_one timed out on 2 of 2 ranks" in message
    assert "rank 1 did not finish within 20 s and was killed" in message
    # The stacks dumped just before the deadline show where each rank was stuck.
    assert "in hang_on_rank_one" in message
    assert timeout <= elapsed < timeout + 15, elapsed
    assert not multiprocessing.active_children()
