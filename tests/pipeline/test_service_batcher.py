"""pipeline/service/batcher.py with a stand-in scorer: batches are cut as specified, every result goes back to
its own image, the queue is bounded, cancelled images cost no forward pass, and a failing batch fails only its
own requests."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.service.batcher import Batcher, QueueFull, ShuttingDown


class SumScorer:
    """score = the row's sum, map = the row's first channel; records every batch's size."""

    image_size = 2

    def __init__(self, fail_above: float | None = None, delay: float = 0.0) -> None:
        self.batches: list[int] = []
        self.fail_above, self.delay = fail_above, delay

    def preprocess(self, image):
        return image

    def stack(self, rows):
        return np.stack(rows)

    def predict(self, images):
        time.sleep(self.delay)
        self.batches.append(len(images))
        scores = images.reshape(len(images), -1).sum(axis=1).astype(np.float32)
        if self.fail_above is not None and (scores > self.fail_above).any():
            raise RuntimeError("the stand-in model failed")
        return scores, images[:, 0].astype(np.float32)


def _row(value: float) -> tuple[np.ndarray, tuple[int, int]]:
    return np.full((3, 2, 2), value / 12, dtype=np.float32), (4, 3)


def test_concurrent_images_are_batched_and_each_gets_its_own_result():
    scorer = SumScorer(delay=0.05)
    batcher = Batcher(scorer, max_batch=4, max_wait_s=0.2, max_queue=64)
    batcher.start()
    futures = [batcher.submit([_row(float(value))])[0] for value in range(10)]
    results = [future.result(10) for future in futures]
    assert batcher.close(10)
    assert [round(r.scored.score, 4) for r in results] == [float(v) for v in range(10)]
    assert sum(scorer.batches) == 10 and max(scorer.batches) == 4 and len(scorer.batches) == 3  # 4 + 4 + 2
    assert all(r.batch_size in (2, 4) and r.scored.size == (4, 3) for r in results)


def test_the_first_image_waits_at_most_max_wait():
    scorer = SumScorer()
    batcher = Batcher(scorer, max_batch=8, max_wait_s=0.3, max_queue=8)
    batcher.start()
    started = time.monotonic()
    result = batcher.submit([_row(1.0)])[0].result(10)
    waited = time.monotonic() - started
    batcher.close(10)
    assert 0.25 <= waited < 2.0 and result.batch_size == 1 and 0.25 <= result.queue_s < 2.0


def test_queue_is_bounded_and_closed_batcher_refuses():
    scorer = SumScorer()
    batcher = Batcher(scorer, max_batch=8, max_wait_s=5.0, max_queue=3)  # not started: nothing leaves the queue
    batcher.submit([_row(1.0), _row(2.0)])
    with pytest.raises(QueueFull):
        batcher.submit([_row(3.0), _row(4.0)])
    assert batcher.depth == 2  # nothing of the refused request was queued
    batcher.start()
    assert batcher.close(10)  # drains the two queued images before stopping
    assert scorer.batches == [2]
    with pytest.raises(ShuttingDown):
        batcher.submit([_row(1.0)])


def test_cancelled_images_cost_no_forward_pass():
    scorer = SumScorer()
    batcher = Batcher(scorer, max_batch=2, max_wait_s=0.3, max_queue=8)
    batcher.start()
    gone = batcher.submit([_row(5.0)])[0]
    assert gone.cancel()
    time.sleep(0.5)
    assert scorer.batches == []
    assert batcher.submit([_row(6.0)])[0].result(10).scored.score == pytest.approx(6.0)
    batcher.close(10)
    assert scorer.batches == [1]


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
    scorer = SumScorer(fail_above=6.5)
    batcher = Batcher(scorer, max_batch=1, max_wait_s=0.0, max_queue=8)
    batcher.start()
    failing = batcher.submit([_row(7.0)])[0]
    with pytest.raises(RuntimeError, match="stand-in model failed"):
        failing.result(10)
    assert batcher.submit([_row(2.0)])[0].result(10).scored.score == pytest.approx(2.0)
    assert batcher.close(10)
    assert scorer.batches == [1, 1]
