"""What one model replica does (Ray-free): adapters loaded into the engine on first use, and
requests for any mix of adapters generated together (`MixedBatcher` -> `Engine.generate_many`;
with the continuous engine each request goes straight to its scheduler, `engine.submit`).

The adapter cache is the caller's: it passes `acquire(name)`, which loads an adapter (with
`load_adapter`) unless it holds it already; Ray Serve's multiplexer is that cache (LRU), and
dropping an `AdapterLease` unloads its adapter. Failures reach the caller as error dicts
(`http_errors.raise_for_error` turns them back into answers).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from oikyo_ray.config import ServeConfig
from oikyo_ray.errors import RegistryError
from oikyo_ray.serve.adapters import AdapterError, AdapterNotFound, fetch_adapter, resolve_adapter
from oikyo_ray.serve.batcher import MixedBatcher
from oikyo_ray.serve.http_errors import adapter_error_dict, internal_error_dict
from oikyo_ray.serve.published import adapter_uri, parse_variant

log = logging.getLogger(__name__)

# (adapter of each request, the base being None; seconds the engine took): called after every batch
OnBatch = Callable[[list, float], None]


class AdapterLease:
    """What the adapter cache holds per adapter; when the cache drops it, the adapter is unloaded."""

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name

    def __del__(self):
        self.engine.remove_adapter(self.name)


async def load_adapter(engine, name: str, cfg: ServeConfig, cache_dir: str, registry_root: str = "") -> AdapterLease:
    """Load adapter `name`: a registry version (`model-vN` of a served registry model), a
    configured adapter, or one under the adapter root."""
    path = await asyncio.to_thread(_adapter_path, name, cfg, cache_dir, registry_root)
    await asyncio.to_thread(engine.add_adapter, name, str(path))
    return AdapterLease(engine, name)


def _adapter_path(name: str, cfg: ServeConfig, cache_dir: str, registry_root: str) -> Path:
    found = parse_variant(name, cfg.registry_models)
    if found is None:
        return resolve_adapter(name, cfg.adapters, cfg.adapter_root, cache_dir)
    try:
        uri = adapter_uri(registry_root, *found)
    except RegistryError as e:
        raise AdapterNotFound(str(e), f"model {name!r} not found") from None
    return fetch_adapter(uri, name, cache_dir)


class ModelReplica:
    def __init__(
        self,
        engine,
        acquire: Callable[[str], Awaitable],
        max_batch_size: int,
        wait_s: float,
        on_batch: OnBatch | None = None,
        max_adapters: int | None = None,
    ):
        """`max_adapters`: how many adapters the cache holds at once; a batch asking for more
        runs in parts (loading the last would evict the first before it ran)."""
        self.engine, self.acquire, self.on_batch = engine, acquire, on_batch
        self.max_adapters = max_adapters
        # a continuous engine batches per decoding step itself: no micro-batcher in front of it
        self.batcher = None if hasattr(engine, "submit") else MixedBatcher(self._run_batch, max_batch_size, wait_s)
        if self.batcher is None and on_batch:
            engine.scheduler.on_step = on_batch  # called per decoding step
        self.pending = 0  # generations asked for and not answered
        self.last_progress = time.monotonic()  # a batch done or a streamed piece

    def stalled(self, after_s: float) -> bool:
        """Work is waiting and the engine has shown no progress for `after_s`: the health check
        fails on this so Serve replaces the replica (a wedged engine never recovers by itself)."""
        last = max(self.last_progress, getattr(self.engine, "last_progress", float("-inf")))  # a decoding step
        return self.pending > 0 and time.monotonic() - last > after_s

    async def generate(self, adapter: str | None, prompt: str, sampling: dict) -> dict:
        """{"text", "prompt_tokens", "completion_tokens", "finish_reason"} or an error dict."""
        failed = await self._ready(adapter)
        if failed:
            return failed
        item = {"adapter": adapter, "prompt": prompt, "sampling": sampling}
        with self._working():
            if self.batcher is None:
                return await self._submit(item)
            return await self.batcher.submit(item)

    async def _submit(self, item: dict) -> dict:
        """One request on the continuous engine; an adapter evicted before the request joined the
        batch is loaded again (once). Leaving (timeout, client gone) frees its row."""
        cancel = threading.Event()
        try:
            try:
                return await self._engine_call(item, cancel)
            except KeyError:
                if not item["adapter"]:
                    raise
                await self.acquire(item["adapter"])
                return await self._engine_call(item, cancel)
        except Exception:  # noqa: BLE001 - this request's failure only; logged, answered without its text
            log.exception("generation failed")
            return internal_error_dict()
        finally:
            cancel.set()
            self.last_progress = time.monotonic()

    async def _engine_call(self, item: dict, cancel: threading.Event) -> dict:
        fut = self.engine.submit(item["adapter"], item["prompt"], item["sampling"], cancel=cancel)
        return await asyncio.wrap_future(fut)

    async def stream(self, adapter: str | None, prompt: str, sampling: dict) -> AsyncIterator[str | dict]:
        """Text pieces as they are generated, or one error dict (also after some pieces, when
        generation fails midway). Leaving the iteration early (client gone) stops generation."""
        failed = await self._ready(adapter)
        if failed:
            yield failed
            return
        cancel = threading.Event()
        with self._working():
            try:
                pieces = (
                    self.engine.astream(adapter, prompt, sampling, cancel)
                    if self.batcher is None
                    else _in_thread(lambda: self.engine.stream(adapter, prompt, sampling, cancel))
                )
                async for piece in pieces:
                    self.last_progress = time.monotonic()
                    yield piece
            except Exception:  # noqa: BLE001 - one request's failure, logged; its stream ends with an error
                log.exception("streaming generation failed")
                yield internal_error_dict()
            finally:
                cancel.set()

    @contextmanager
    def _working(self) -> Iterator[None]:
        if self.pending == 0:
            self.last_progress = time.monotonic()  # idle time is not a stall
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

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
        parts = _by_adapter_count(items, self.max_adapters)
        if len(parts) > 1:
            by_index: dict[int, dict] = {}
            for part in parts:
                for i, res in zip(part, await self._run_batch([items[i] for i in part])):
                    by_index[i] = res
            return [by_index[i] for i in range(len(items))]
        for it in items:  # an LRU eviction may have raced this batch: reload quietly
            if it["adapter"] and it["adapter"] not in self.engine.loaded:
                await self.acquire(it["adapter"])
        t0 = time.perf_counter()
        try:
            outs = await asyncio.to_thread(self.engine.generate_many, items)
        except Exception:  # noqa: BLE001 - find the culprit: each row alone, so only it fails
            if len(items) == 1:
                log.exception("generation failed")
                return [internal_error_dict()]
            log.warning("a batch of %d failed; retrying its rows one by one", len(items))
            outs = [(await self._run_batch([it]))[0] for it in items]
        self.last_progress = time.monotonic()
        if self.on_batch:
            self.on_batch([it["adapter"] for it in items], time.perf_counter() - t0)
        return outs


def _by_adapter_count(items: list[dict], most: int | None) -> list[list[int]]:
    """Indices of `items` in groups that each use at most `most` distinct adapters (base free)."""
    if most is None or len({it["adapter"] for it in items if it["adapter"]}) <= most:
        return [list(range(len(items)))]
    groups: list[list[int]] = []
    names: list[set] = []
    for i, it in enumerate(items):
        a = it["adapter"]
        for g, ns in zip(groups, names):
            if not a or a in ns or len(ns) < most:
                g.append(i)
                if a:
                    ns.add(a)
                break
        else:
            groups.append([i])
            names.append({a} if a else set())
    return groups


async def _in_thread(make: Callable[[], Iterator[str]]) -> AsyncIterator[str]:
    """Iterate a blocking iterator in a worker thread, yielding its items on the event loop; its
    error is raised here. If the consumer leaves early, the iterator is closed in its thread at its
    next item (the engine's stream then stops generating)."""
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    done, gone = object(), threading.Event()
    failed: list[BaseException] = []

    def produce() -> None:
        it = make()
        try:
            for item in it:
                if gone.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            failed.append(e)
        finally:
            close = getattr(it, "close", None)
            if close:
                close()
            loop.call_soon_threadsafe(queue.put_nowait, done)

    task = loop.run_in_executor(None, produce)
    try:
        while (item := await queue.get()) is not done:
            yield item
    finally:
        gone.set()
    await task
    if failed:
        raise failed[0]
