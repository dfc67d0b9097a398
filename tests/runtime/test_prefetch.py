"""Decoding ahead on a thread keeps order, re-raises the producer's errors, and stops early."""

from __future__ import annotations

import threading
import time

import pytest

from videoxl.runtime.pipeline import prefetch
from videoxl.video import VideoError


def test_order_and_completion():
    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))
    assert list(prefetch(iter([]))) == []


def test_producer_error_is_reraised_after_the_good_items():
    def items():
        yield 1
        yield 2
        raise VideoError("clip.mp4: truncated after 2 of 9 frames")

    seen = []
    with pytest.raises(VideoError, match="truncated after 2"):
        for item in prefetch(items()):
            seen.append(item)
    assert seen == [1, 2]


def test_runs_ahead_and_stops_when_the_consumer_leaves():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    stream = prefetch(items(), depth=1)
    assert next(stream) == 0
    time.sleep(0.2)
    assert len(produced) >= 2  # the next item was made while the consumer was busy
    stream.close()  # leaving early
    time.sleep(0.3)
    count = len(produced)
    time.sleep(0.2)
    assert len(produced) == count < 1000
    assert not any(t.name == "videoxl-prefetch" and t.is_alive() for t in threading.enumerate())
