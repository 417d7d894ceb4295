"""Concurrent requests grouped into batches, scored by one worker thread through the engine's loop.

Requests put preprocessed rows into a bounded queue (:meth:`Batcher.submit`, refused with
:class:`QueueFull` beyond ``max_queue`` images, so memory stays bounded). The worker thread runs
:func:`pipeline.engine.score_batches` over a generator of :class:`~pipeline.engine.Batch` es that it
cuts from the queue: it takes the first waiting image, waits at most ``max_wait_s`` for up to
``max_batch - 1`` more, and each row's index in the batch maps its :class:`~pipeline.engine.ScoredImage`
back to the request's future. The event loop only awaits futures, so it never blocks on the model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pipeline.engine import Batch, ScoredImage, Scorer, score_batches

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """More images wait for the model than ``max_queue`` allows."""


class ShuttingDown(Exception):
    """The service stopped taking images (SIGTERM)."""


@dataclass(frozen=True)
class BatchResult:
    """One image's scores and how its batch ran.

    Attributes:
        scored: The engine's result (``index``: the row in its batch).
        batch_size: Images in the forward pass it was part of.
        queue_s: Seconds from :meth:`Batcher.submit` to the start of its forward pass.
        model_s: Seconds of that forward pass.
    """

    scored: ScoredImage
    batch_size: int
    queue_s: float
    model_s: float


@dataclass
class _Ticket:
    row: Any
    size: tuple[int, int]
    enqueued: float
    future: Future = field(default_factory=Future)


class Batcher:
    """The bounded queue and the worker thread that scores it (see the module).

    Args:
        scorer: The engine's scorer (torch or an exported graph).
        max_batch: Most images per forward pass.
        max_wait_s: Longest the first image of a batch waits for more.
        max_queue: Most images waiting (submitted, not yet in a forward pass).
        on_batch: Called with each batch's size (metrics).
    """

    def __init__(self, scorer: Scorer, max_batch: int, max_wait_s: float, max_queue: int,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.scorer = scorer
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._on_batch = on_batch or (lambda size: None)
        self._queue: deque[_Ticket] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._taken: list[_Ticket] = []
        self._started: float = 0.0
        self._thread = threading.Thread(target=self._run, name="anomalyclip-model", daemon=True)

    @property
    def depth(self) -> int:
        """Images waiting for the model."""
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        self._thread.start()

    def submit(self, rows: list[tuple[Any, tuple[int, int]]]) -> list[Future]:
        """Queue ``(preprocessed row, (width, height))`` per image; one future per image (a :class:`BatchResult`).

        Raises:
            QueueFull: The images do not fit in the queue (nothing is queued).
            ShuttingDown: :meth:`close` was called.
        """
        now = time.monotonic()
        tickets = [_Ticket(row, size, now) for row, size in rows]
        with self._cond:
            if self._closed:
                raise ShuttingDown
            if len(self._queue) + len(tickets) > self.max_queue:
                raise QueueFull
            self._queue.extend(tickets)
            self._cond.notify()
        return [ticket.future for ticket in tickets]

    def close(self, timeout: float | None = None) -> bool:
        """Take no more images, score the queued ones, stop the worker; whether it stopped within ``timeout``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _next_tickets(self) -> list[_Ticket] | None:
        """The tickets of the next batch (``None``: closed and drained)."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            deadline = time.monotonic() + self.max_wait_s
            while len(self._queue) < self.max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            count = min(self.max_batch, len(self._queue))
            tickets = [self._queue.popleft() for _ in range(count)]
        # A future cancelled by its request (the client went away) is dropped here: it costs no forward pass.
        return [ticket for ticket in tickets if ticket.future.set_running_or_notify_cancel()]

    def _batches(self) -> Iterator[Batch]:
        while (tickets := self._next_tickets()) is not None:
            if not tickets:
                continue
            self._taken = tickets
            self._started = time.monotonic()
            yield Batch(indices=list(range(len(tickets))), images=self.scorer.stack([t.row for t in tickets]),
                        sizes=[t.size for t in tickets])

    def _run(self) -> None:
        while True:
            try:
                for scored in score_batches(self.scorer, self._batches()):
                    self._deliver(scored)
                return
            except Exception as error:  # noqa: BLE001 - the batch's requests get the error, the worker goes on
                logger.exception("scoring a batch of %d image(s) failed", len(self._taken))
                for ticket in self._taken:
                    if not ticket.future.done():
                        ticket.future.set_exception(error)

    def _deliver(self, scored: list[ScoredImage]) -> None:
        model_s = time.monotonic() - self._started
        self._on_batch(len(scored))
        for one in scored:
            ticket = self._taken[one.index]
            ticket.future.set_result(BatchResult(one, len(scored), self._started - ticket.enqueued, model_s))
