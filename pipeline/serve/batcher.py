"""Micro-batching: requests that arrive together are scored as one batch.

Each request puts its photos and captions on a queue and awaits a future. One asyncio task takes the first waiting
request, keeps collecting for up to ``wait_s`` (or until ``max_rows`` rows), scores them all in one call on a worker
thread (the event loop stays free to accept more requests meanwhile), then hands each request its own rows. A
request that gave up (its time ran out) is dropped before scoring.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
Score = Callable[[list[Any], list[str]], np.ndarray]  # (photos, captions) -> (N, C) probabilities


@dataclass
class _Job:
    photos: list[Any]
    captions: list[str]
    future: asyncio.Future[np.ndarray]

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class BatchStats:
    """What the batcher did: requests and rows scored, batches run, the largest batch (rows)."""

    requests: int = 0
    rows: int = 0
    batches: int = 0
    largest: int = 0
    busy_s: float = 0.0
    sizes: list[int] = field(default_factory=list)  # the last 100 batch sizes, for /api/health

    def add(self, jobs: int, rows: int, took: float) -> None:
        self.requests += jobs
        self.rows += rows
        self.batches += 1
        self.largest = max(self.largest, rows)
        self.busy_s += took
        self.sizes = [*self.sizes[-99:], rows]


class QueueFull(Exception):
    """More rows are waiting than the server takes (``max_queue``): the client should retry later."""


class MicroBatcher:
    """Collects concurrent requests into batches of up to ``max_rows`` rows, waiting at most ``wait_s`` for more."""

    def __init__(self, score: Score, *, max_rows: int = 32, wait_s: float = 0.01, max_queue: int = 1024) -> None:
        self.score, self.max_rows, self.wait_s, self.max_queue = score, max_rows, wait_s, max_queue
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiting = 0  # rows queued, not yet scored
        self._held: _Job | None = None  # a request that would have overfilled the last batch: first of the next

    async def submit(self, photos: Sequence[Any], captions: Sequence[str]) -> np.ndarray:
        """The (len(captions), C) probabilities of these rows, scored with whatever else arrived at the same time."""
        if self._task is None or self._task.done():  # started on first use, in the server's own event loop
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._loop())
        if self._waiting + len(captions) > self.max_queue:
            raise QueueFull(f"{self._waiting} rows are waiting already (at most {self.max_queue})")
        job = _Job(list(photos), list(captions), asyncio.get_running_loop().create_future())
        self._waiting += len(job)
        assert self._queue is not None
        await self._queue.put(job)
        return await job.future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _collect(self) -> list[_Job]:
        """The first waiting request, then whatever joins it within ``wait_s``, up to ``max_rows`` rows."""
        assert self._queue is not None
        jobs = [self._held if self._held is not None else await self._queue.get()]
        self._held = None
        rows = len(jobs[0])
        deadline = time.monotonic() + self.wait_s
        while rows < self.max_rows:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), left)
                except TimeoutError:
                    break
            if rows + len(job) > self.max_rows:  # a request is never split: it leads the next batch
                self._held = job
                break
            jobs.append(job)
            rows += len(job)
        return jobs

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            self._waiting -= sum(len(j) for j in jobs)  # rows of the held request still count as waiting
            jobs = [j for j in jobs if not j.future.done()]  # cancelled: the request timed out
            if not jobs:
                continue
            photos = [p for j in jobs for p in j.photos]
            captions = [c for j in jobs for c in j.captions]
            t0 = time.monotonic()
            try:
                probs = await loop.run_in_executor(None, self.score, photos, captions)
            except Exception as e:  # handed to each request, which answers with it; the loop goes on
                log.exception("scoring a batch of %d rows failed", len(captions))
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            self.stats.add(len(jobs), len(captions), time.monotonic() - t0)
            start = 0
            for j in jobs:
                if not j.future.done():
                    j.future.set_result(probs[start:start + len(j)])
                start += len(j)
