"""An asyncio micro-batcher that mixes adapters in one batch (Ray-free).

Serve's `@serve.batch` splits a batch by multiplexed model id, which would serialise adapters;
this queue batches whatever arrives within `wait_s` (up to `max_size`) regardless of adapter.
An idle batcher starts at once (no wait added to a lone request); under load, requests that
queued while the previous batch ran are taken together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class MixedBatcher:
    def __init__(self, run: Callable[[list], Awaitable[list]], max_size: int, wait_s: float):
        self.run, self.max_size, self.wait_s = run, max_size, wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self._worker: asyncio.Task | None = None
        self._last_end = float("-inf")

    async def submit(self, item):
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((item, fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._loop())
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            busy = loop.time() - self._last_end < self.wait_s  # traffic is flowing: worth waiting
            deadline = loop.time() + (self.wait_s if busy else 0.0)
            while len(batch) < self.max_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            while len(batch) < self.max_size:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [(item, fut) for item, fut in batch if not fut.cancelled()]  # callers gone
            if not batch:
                continue
            try:
                results = await self.run([item for item, _ in batch])
                self._last_end = loop.time()
                for (_, fut), res in zip(batch, results):
                    if not fut.done():
                        fut.set_result(res)
            except Exception as e:  # noqa: BLE001 - every waiter gets the batch's error
                self._last_end = loop.time()
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
