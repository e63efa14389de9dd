"""The serving process's garbage collector: startup frozen, young collections rare, cycles still freed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from proxy.gc_tuning import YOUNG_THRESHOLD, tune_collector


@pytest.fixture
def restored() -> Iterator[tuple[int, int, int]]:
    """The collector's thresholds before the test, put back after it with nothing frozen
    (the test process must not keep every later test's objects frozen)."""
    threshold = gc.get_threshold()
    try:
        yield threshold
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_objects_alive_at_startup_are_frozen_out_of_every_collection(restored):
    startup_object = _Node()
    assert any(o is startup_object for o in gc.get_objects())
    frozen = tune_collector()
    assert frozen == gc.get_freeze_count() > 0
    assert not any(o is startup_object for o in gc.get_objects())


def test_the_young_threshold_is_raised_and_the_older_ones_kept(restored):
    _, older, oldest = restored
    tune_collector()
    assert gc.get_threshold() == (YOUNG_THRESHOLD, older, oldest)


def test_calls_in_flight_holding_objects_start_no_young_collection(restored):
    tune_collector()
    collections: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.collect()
    gc.callbacks.append(count)
    try:
        # 16 calls in flight holding ~150 containers each, while others come and go: past
        # the interpreter's default threshold (700), short of ours.
        in_flight = [[{} for _ in range(150)] for _ in range(16)]
        for _ in range(1_000):
            done = [{} for _ in range(150)]
            del done
    finally:
        gc.callbacks.remove(count)
    assert len(in_flight) == 16
    assert collections == []


def test_a_cycle_made_after_tuning_is_still_collected(restored):
    tune_collector()
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None  # reference counting alone cannot free a cycle
    gc.collect()
    assert gone() is None
