"""What one model replica does (Ray-free): adapters loaded into the engine on first use, and
requests for any mix of adapters generated together (`MixedBatcher` -> `Engine.generate_many`).

The adapter cache is the caller's: it passes `acquire(name)`, which loads an adapter (with
`load_adapter`) unless it holds it already; Ray Serve's multiplexer is that cache (LRU), and
dropping an `AdapterLease` unloads its adapter. Failures reach the caller as error dicts
(`http_errors.raise_for_error` turns them back into answers).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from oikyo_ray.config import ServeConfig
from oikyo_ray.serve.adapters import AdapterError, resolve_adapter
from oikyo_ray.serve.batcher import MixedBatcher
from oikyo_ray.serve.http_errors import adapter_error_dict, internal_error_dict

log = logging.getLogger(__name__)

# (adapter of each request, the base being None; seconds the engine took): called after every batch
OnBatch = Callable[[list, float], None]


class AdapterLease:
    """What the adapter cache holds per adapter; when the cache drops it, the adapter is unloaded."""

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name

    def __del__(self):
        self.engine.remove_adapter(self.name)


async def load_adapter(engine, name: str, cfg: ServeConfig, cache_dir: str) -> AdapterLease:
    path = await asyncio.to_thread(resolve_adapter, name, cfg.adapters, cfg.adapter_root, cache_dir)
    await asyncio.to_thread(engine.add_adapter, name, str(path))
    return AdapterLease(engine, name)


class ModelReplica:
    def __init__(
        self,
        engine,
        acquire: Callable[[str], Awaitable],
        max_batch_size: int,
        wait_s: float,
        on_batch: OnBatch | None = None,
    ):
        self.engine, self.acquire, self.on_batch = engine, acquire, on_batch
        self.batcher = MixedBatcher(self._run_batch, max_batch_size, wait_s)

    async def generate(self, adapter: str | None, prompt: str, sampling: dict) -> dict:
        """{"text", "prompt_tokens", "completion_tokens", "finish_reason"} or an error dict."""
        failed = await self._ready(adapter)
        if failed:
            return failed
        return await self.batcher.submit({"adapter": adapter, "prompt": prompt, "sampling": sampling})

    async def stream(self, adapter: str | None, prompt: str, sampling: dict) -> AsyncIterator[str | dict]:
        """Text pieces as they are generated, or one error dict."""
        failed = await self._ready(adapter)
        if failed:
            yield failed
            return
        async for piece in _in_thread(lambda: self.engine.stream(adapter, prompt, sampling)):
            yield piece

    async def _ready(self, adapter: str | None) -> dict | None:
        """None once the adapter is loaded (or for the base); else the error dict to answer with."""
        if not adapter:
            return None
        try:
            await self.acquire(adapter)
        except AdapterError as e:
            log.warning("adapter %r: %s", adapter, e)  # the full message, with paths, for the operator
            return adapter_error_dict(e)
        except Exception:  # noqa: BLE001 - a broken download or adapter must not leak its text
            log.exception("loading adapter %r failed", adapter)
            return internal_error_dict()
        return None

    async def _run_batch(self, items: list[dict]) -> list[dict]:
        for it in items:  # an LRU eviction may have raced this batch: reload quietly
            if it["adapter"] and it["adapter"] not in self.engine.loaded:
                await self.acquire(it["adapter"])
        t0 = time.perf_counter()
        outs = await asyncio.to_thread(self.engine.generate_many, items)
        if self.on_batch:
            self.on_batch([it["adapter"] for it in items], time.perf_counter() - t0)
        return outs


async def _in_thread(make: Callable[[], Iterator[str]]) -> AsyncIterator[str]:
    """Iterate a blocking iterator in a worker thread, yielding its items on the event loop."""
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    done = object()

    def produce() -> None:
        try:
            for item in make():
                loop.call_soon_threadsafe(queue.put_nowait, item)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, done)

    task = loop.run_in_executor(None, produce)
    while (item := await queue.get()) is not done:
        yield item
    await task
