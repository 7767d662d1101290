"""Adaptive batching of model calls inside the serving process.

Why not BentoML's own batching: a batchable @bentoml.api is batched by the dispatcher in front
of its HTTP endpoint, so an upload route can only reach it through an HTTP call. Both ways of
making that call cost more than batching saves for our model (measured with
benchmarks/serve.py on this 2-core machine): through bentoml.depends the images go to a second
process, pickled over a local socket, and that gave half the Flask baseline's throughput and
connection resets ("Server disconnected") at 32 concurrent calls; through the service's own
in-process proxy, BentoML JSON-encodes the (N, 128, 128, 3) array as nested lists.

So the batching happens here, in the same process, with the same two limits: while the model
is busy, arriving images queue; when it is free, everything queued (up to max_batch_size
images) goes into the next forward pass. The batch size follows the load: 1 when requests are
rare (no added latency beyond max_wait_ms), up to max_batch_size under load.

Several forward passes may run at once (max_concurrent), each in its own thread: ONNX Runtime
releases the GIL, so one process keeps every core busy, and requests from all connections wait
in this one FIFO queue. With a process per core instead, a keep-alive connection stays with the
process that accepted it, and one process can end up with most of the connections (BentoML
issue #5426). Big batches buy nothing here either: ONNX Runtime's time per image on the CPU does
not fall with the batch size, and every image of a batch waits for the whole batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool


@dataclass
class _Job:
    images: np.ndarray  # (n, ...) images of one request
    future: asyncio.Future[np.ndarray]


class MicroBatcher:
    """`await batcher(images)` -> forward(images), computed together with concurrent calls.

    forward: (N, ...) array -> (N, ...) array, row i answering input i; it runs in worker
    threads, at most max_concurrent calls at a time (so it must be thread-safe, as an ONNX
    Runtime session is). A request larger than max_batch_size is never split: it makes a batch
    of its own.
    """

    def __init__(
        self,
        forward: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int,
        max_wait_ms: float,
        max_concurrent: int = 1,
    ) -> None:
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self._free_slots = asyncio.Semaphore(max_concurrent)  # forward passes that may start
        self._running: set[asyncio.Task[None]] = set()  # held, or the loop may drop them
        self._queue: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent batches, for tests

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._serve())
        job = _Job(images, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._arrived.set()
        return await job.future

    async def _serve(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._queue:
                await self._free_slots.acquire()  # images keep queueing while every slot is busy
                await self._gather_company()
                task = asyncio.get_running_loop().create_task(self._run(self._take_batch()))
                self._running.add(task)
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._free_slots.release()

    async def _gather_company(self) -> None:
        """Let a lone image wait up to max_wait_s for others (a forward slot is idle meanwhile)."""
        deadline = time.monotonic() + self.max_wait_s
        while self._queued_images() < self.max_batch_size and time.monotonic() < deadline:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - time.monotonic())
            except TimeoutError:
                break

    def _queued_images(self) -> int:
        return sum(len(job.images) for job in self._queue)

    def _take_batch(self) -> list[_Job]:
        batch = [self._queue.popleft()]
        size = len(batch[0].images)
        while self._queue and size + len(self._queue[0].images) <= self.max_batch_size:
            size += len(self._queue[0].images)
            batch.append(self._queue.popleft())
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        self.batch_sizes.append(sum(len(job.images) for job in batch))
        try:
            outputs = await run_in_threadpool(
                self.forward, np.concatenate([job.images for job in batch])
            )
        except Exception as err:  # every caller of this batch gets the model's error
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        start = 0
        for job in batch:
            if not job.future.done():  # a caller that went away has a cancelled future
                job.future.set_result(outputs[start : start + len(job.images)])
            start += len(job.images)
