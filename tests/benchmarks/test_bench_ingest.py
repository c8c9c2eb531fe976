"""``moco bench ingest``'s windows: one statistic on both sides, whatever a loader buffers ahead."""

import pytest

from benchmarks import bench_ingest


class _Clock:
    """A fake clock that the loader advances."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _timed(start_up: float, buffered: int, steady_gap: float, batches: int) -> dict:
    """A loader that takes ``start_up`` s to its first batch, then hands out ``buffered`` batches at
    once (what it prepared meanwhile), then one every ``steady_gap`` s; batches of 10 images."""
    clock = _Clock()

    def loader():
        for index in range(batches):
            clock.now += start_up if index == 0 else (0.0 if index <= buffered else steady_gap)
            yield index

    return bench_ingest._timed_consumption(loader(), lambda batch: 10, "test", total=None, clock=clock)


def test_the_steady_window_ignores_what_a_loader_buffered_before_its_first_batch():
    eager = _timed(start_up=5.0, buffered=8, steady_gap=0.5, batches=40)
    lazy = _timed(start_up=5.0, buffered=0, steady_gap=0.5, batches=40)
    assert eager["img_per_s"] == pytest.approx(20.0) == lazy["img_per_s"]  # 10 images per 0.5 s
    # Counting from the first batch credits the buffered batches as delivered in no time.
    assert eager["after_first_img_per_s"] > 1.15 * lazy["after_first_img_per_s"]
    assert lazy["from_start_img_per_s"] == pytest.approx(400 / (5.0 + 39 * 0.5))


def test_too_few_batches_to_time_is_an_error():
    with pytest.raises(ValueError, match="too few"):
        _timed(start_up=1.0, buffered=0, steady_gap=0.5, batches=bench_ingest.STEADY_SKIP_BATCHES + 2)
