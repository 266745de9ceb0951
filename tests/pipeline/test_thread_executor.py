"""ThreadExecutor: one search's re-rank reads on threads, results in item order, errors raised."""

from __future__ import annotations

import threading
import time

import pytest

from vecpress.pipeline.executor import ThreadExecutor


def test_map_keeps_item_order_and_runs_items_side_by_side():
    seen = set()

    def work(item, *, scale):
        seen.add(threading.get_ident())
        time.sleep(0.05 * (3 - item))  # the first items finish last
        return item * scale

    assert ThreadExecutor(3).map(work, [0, 1, 2], desc="t", shared={"scale": 10}) == [0, 10, 20]
    assert len(seen) > 1


def test_an_items_error_is_raised():
    def work(item):
        if item == 1:
            raise ValueError("item 1 is bad")
        return item

    with pytest.raises(ValueError, match="item 1 is bad"):
        ThreadExecutor(2).map(work, [0, 1, 2], desc="t")
    assert ThreadExecutor(1).map(work, [0, 2], desc="t") == [0, 2]
