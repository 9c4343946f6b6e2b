"""The continuously batching engine (Ray-free): requests join and leave the running batch between
decoding steps, each row with its own adapter, sampling, stop rules, stream and deadline.

One scheduler thread loops: drop rows that were cancelled or ran out of time, prefill the
requests that arrived (their rows joining the running batch's KV cache, `kv_rows.KVRows`), then
one decoding step for every row; a row leaves as soon as it is done. Adapters mix per row
through peft's `adapter_names` (and `multi_lora.MixedLoRA`), exactly as in `engine.Engine`, whose
adapter handling this engine inherits.

Why not transformers' own continuous batching (`generate_batch`, paged attention): it packs every
request into one flattened row, so peft's per-row `adapter_names` cannot name an adapter per
request (it is silently ignored: a mixed batch ran every request with the same adapter), and it
has no per-request streaming callback, cancel flag or sampling settings. This scheduler runs the
model's ordinary forward over `DynamicCache` instead.

Requests asking for logprobs or echo, or for no new tokens, take `Engine`'s static path.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from oikyo_ray.config import ModelConfig
from oikyo_ray.model.chat_template import stop_token_ids
from oikyo_ray.serve.engine import BASE_ROW, Engine
from oikyo_ray.serve.kv_rows import KVRows
from oikyo_ray.serve.sequence import OnPiece, Sequence

log = logging.getLogger(__name__)

OnStep = Callable[[list, float], None]  # (adapter of each running row, seconds the step took)
_DONE = object()


def needs_static_path(sampling: dict) -> bool:
    return sampling.get("logprobs") is not None or bool(sampling.get("echo")) or sampling["max_new_tokens"] <= 0


class Scheduler:
    """The running batch and the requests waiting to join it; all model work under `engine._lock`."""

    def __init__(self, engine: ContinuousEngine, max_running: int):
        self.engine, self.max_running = engine, max_running
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence] = []  # the running batch, in KV-cache row order
        self.kv: KVRows | None = None
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.last_progress = time.monotonic()  # a step done (the replica's stall check reads it)
        self.on_step: OnStep | None = None
        self.autostart = True  # False: nothing runs until `step()` is called (tests drive it so)

    def submit(self, seq: Sequence) -> None:
        with self.wake:
            self.waiting.append(seq)
            if self.autostart and (self.thread is None or not self.thread.is_alive()):
                self.thread = threading.Thread(target=self._loop, name="oikyo-continuous", daemon=True)
                self.thread.start()
            self.wake.notify()

    def in_use(self) -> set[str]:
        """Adapters of running rows (their weights must stay until those rows leave)."""
        return {s.adapter for s in self.rows if s.adapter}

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.waiting and not self.rows:
                    self.wake.wait()
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - the model itself failed: every running row fails
                log.exception("a decoding step failed; failing its %d rows", len(self.rows))
                for seq in self.rows:
                    seq.fail(e)
                self.rows, self.kv = [], None

    def step(self) -> None:
        """One round: rows that were cancelled or timed out leave, waiting requests join, one token each."""
        t0 = time.perf_counter()
        with self.engine._lock:
            self.engine._purge()
            self._leave([i for i, s in enumerate(self.rows) if not self._still_wanted(s)])
            self._admit()
            if self.rows:
                self._decode()
        self.last_progress = time.monotonic()
        if self.on_step and self.rows:
            self.on_step([s.adapter for s in self.rows], time.perf_counter() - t0)

    def _still_wanted(self, seq: Sequence) -> bool:
        if seq.cancel.is_set():
            seq.finish("cancelled")
            return False
        if seq.expired():
            seq.fail(TimeoutError("the request ran past its deadline"))
            return False
        return True

    def _admit(self) -> None:
        """Prefill the waiting requests that fit; each takes its first token and joins the batch."""
        new: list[Sequence] = []
        with self.wake:
            while self.waiting and len(self.rows) + len(new) < self.max_running:
                new.append(self.waiting.popleft())
        # a Future cancelled while waiting (its caller left) is skipped; once running it cannot be
        # cancelled any more, and the caller sets the request's cancel flag instead
        new = [s for s in new if s.future.set_running_or_notify_cancel() and self._still_wanted(s)]
        new = [s for s in new if self._adapter_ready(s)]
        if len(new) <= 1:
            for seq in new:
                self._admit_alone(seq)
            return
        try:
            kv, logits = self._prefill(new)
        except Exception:  # noqa: BLE001 - find the culprit: each prompt alone, so only it fails
            log.warning("a prefill of %d failed; retrying its prompts one by one", len(new))
            for seq in new:
                self._admit_alone(seq)
            return
        self._join(new, kv, logits)

    def _admit_alone(self, seq: Sequence) -> None:
        try:
            kv, logits = self._prefill([seq])
        except Exception as e:  # noqa: BLE001 - this request's own failure
            log.exception("prefill failed")
            seq.fail(e)
            return
        self._join([seq], kv, logits)

    def _adapter_ready(self, seq: Sequence) -> bool:
        if seq.adapter and seq.adapter not in self.engine.loaded:
            seq.fail(KeyError(f"adapter {seq.adapter!r} is not loaded"))  # the replica reloads it
            return False
        return True

    def _prefill(self, seqs: list[Sequence]):
        pad = self.engine.tokenizer.pad_token_id or 0
        return KVRows.prefill(self.engine.model, [s.prompt for s in seqs], pad, **self._adapters(seqs))

    def _join(self, seqs: list[Sequence], kv: KVRows, logits) -> None:
        if self.kv is None:
            self.kv, self.rows = kv, list(seqs)
        else:
            self.kv.join(kv)
            self.rows += seqs
        self._take(len(self.rows) - len(seqs), logits)

    def _decode(self) -> None:
        assert self.kv is not None
        logits = self.kv.decode(self.engine.model, [s.generated[-1] for s in self.rows], **self._adapters(self.rows))
        self._take(0, logits)

    def _take(self, first: int, logits) -> None:
        """Sample each row's next token (rows `first`...), then let finished and failed rows leave."""
        done = []
        argmax = logits.argmax(-1).tolist()  # one device sync for every plain greedy row
        for i, (row_logits, best) in enumerate(zip(logits, argmax), start=first):
            seq = self.rows[i]
            try:
                reason = seq.push(best if seq.plain_greedy() else seq.choose(row_logits))
            except Exception as e:  # noqa: BLE001 - one row's sampling failed: only it fails
                log.warning("sampling failed for one request: %s", e)
                seq.fail(e)
                done.append(i)
                continue
            if reason:
                seq.finish(reason)
                done.append(i)
        self._leave(done)

    def _leave(self, done: list[int]) -> None:
        if not done:
            return
        keep = [i for i in range(len(self.rows)) if i not in set(done)]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.kv = None
        elif self.kv is not None:
            self.kv.keep(keep)

    def _adapters(self, seqs: list[Sequence]) -> dict:
        # every row names its adapter once the model has any (base rows too), as Engine._rows does
        if not self.engine._is_peft():
            return {}
        return {"adapter_names": [s.adapter or BASE_ROW for s in seqs]}


class ContinuousEngine(Engine):
    """`Engine`'s interface (generate_many, stream, adapters, healthy) over the `Scheduler`."""

    request_timeout_s: float | None = None  # a request still running after this fails with TimeoutError
    # `astream` sends the pieces of this long as one message (the first at once): through Serve
    # every message costs CPU in three processes, and with many streams at a token per step each
    # that CPU is the model's (Ray Serve LLM batches its streams the same way)
    stream_interval_s: float = 0.02

    def __init__(self, model_cfg: ModelConfig, model_path: str, max_running: int = 16):
        super().__init__(model_cfg, model_path)
        self.scheduler = Scheduler(self, max_running)
        self.stop_ids = set(stop_token_ids(self.tokenizer))
        self._static = ThreadPoolExecutor(1, "oikyo-static")  # one: Engine's lock serialises them anyway

    @property
    def last_progress(self) -> float:
        return self.scheduler.last_progress

    def _purge(self) -> None:
        """Engine's purge, except for retired adapters that running rows still use (they go once
        those rows leave)."""
        busy = self._retired & self.scheduler.in_use()
        self._retired -= busy
        try:
            super()._purge()
        finally:
            self._retired |= busy

    def submit(
        self,
        adapter: str | None,
        prompt: str | list[int],
        sampling: dict,
        on_piece: OnPiece | None = None,
        cancel: threading.Event | None = None,
    ) -> Future:
        """Queue one request; its Future gives {"text", "prompt_tokens", "completion_tokens",
        "finish_reason"} or raises its own error (KeyError: the adapter is not loaded). Logprobs,
        echo and prompt-only requests run on Engine's static path, in a thread of their own."""
        if needs_static_path(sampling):
            return self._static.submit(self._static_one, adapter, prompt, sampling, on_piece)
        ids = prompt if isinstance(prompt, list) else self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:  # a row with nothing to attend to would decode from NaNs (the static path raises too)
            raise ValueError("the prompt has no tokens")
        timeout = sampling.get("timeout_s", self.request_timeout_s)
        seq = Sequence(
            prompt=list(ids),
            adapter=adapter,
            sampling=sampling,
            stop_ids=self.stop_ids,
            decode=lambda t: self.tokenizer.decode(t, skip_special_tokens=True),
            on_piece=on_piece,
            cancel=cancel or threading.Event(),
            deadline=None if timeout is None else time.monotonic() + timeout,
        )
        self.scheduler.submit(seq)
        return seq.future

    def _static_one(self, adapter: str | None, prompt: str | list[int], sampling: dict, on_piece: OnPiece | None):
        res = Engine.generate_many(self, [{"adapter": adapter, "prompt": prompt, "sampling": sampling}])[0]
        if on_piece and res["text"]:
            on_piece(res["text"])  # one piece: the static path does not stream
        return res

    def generate_many(self, items: list[dict]) -> list[dict]:
        """As Engine's; a row's error is raised after every row is done (the first one)."""
        futures = [self.submit(it["adapter"], it["prompt"], it["sampling"]) for it in items]
        errors = [f.exception() for f in futures]
        if any(errors):
            raise next(e for e in errors if e)
        return [f.result() for f in futures]

    def stream(
        self, adapter: str | None, prompt: str | list[int], sampling: dict, cancel: threading.Event | None = None
    ) -> Iterator[str | dict]:
        """As Engine's: text pieces, then {"finish_reason", "completion_tokens"}; never holds the
        model (other requests keep decoding beside it)."""
        pieces: queue.Queue = queue.Queue()
        cancel = cancel or threading.Event()
        fut = self.submit(adapter, prompt, sampling, pieces.put, cancel)
        fut.add_done_callback(lambda _: pieces.put(_DONE))
        try:
            while (piece := _next(pieces, self.token_timeout_s)) is not _DONE:
                yield piece
            yield _final(fut.result())
        finally:  # done, consumer gone or timed out: the row leaves at the next step
            cancel.set()

    async def astream(
        self, adapter: str | None, prompt: str | list[int], sampling: dict, cancel: threading.Event | None = None
    ) -> AsyncIterator[str | dict]:
        """`stream` for an event loop, without a thread per stream. The first piece goes at once;
        later ones are sent together at most every `stream_interval_s`."""
        box = _Mailbox(asyncio.get_running_loop())
        cancel = cancel or threading.Event()
        fut = self.submit(adapter, prompt, sampling, box.put, cancel)
        fut.add_done_callback(lambda _: box.put(_DONE))
        try:
            while True:
                items = await box.take(self.token_timeout_s)
                text = "".join(i for i in items if i is not _DONE)
                if text:
                    yield text
                if items[-1] is _DONE:
                    break
                await asyncio.sleep(self.stream_interval_s)  # pieces gather meanwhile, waking no one
            yield _final(fut.result())
        finally:
            cancel.set()


class _Mailbox:
    """Pieces from the scheduler thread to one stream on an event loop. The thread wakes the loop
    only when the stream is waiting for a piece: a wake per token and stream would make the
    thread and the loop trade the GIL at every step."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.arrived = loop, asyncio.Event()
        self.items: deque = deque()  # appended by one thread, popped by the loop: deque is safe for that
        self.waiting = threading.Event()

    def put(self, item) -> None:  # any thread
        self.items.append(item)
        if self.waiting.is_set():
            self.waiting.clear()
            self.loop.call_soon_threadsafe(self.arrived.set)

    async def take(self, timeout_s: float) -> list:
        """Every item there, waiting up to `timeout_s` for the first."""
        while not self.items:
            self.arrived.clear()
            self.waiting.set()
            if self.items:  # came between the check and the flag: no wake is coming for it
                break
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout_s)
            except asyncio.TimeoutError:
                raise TimeoutError(f"no token generated for {timeout_s:.0f}s") from None
        self.waiting.clear()
        out = []
        while self.items:
            out.append(self.items.popleft())
        return out


def _next(pieces: queue.Queue, timeout_s: float):
    try:
        return pieces.get(timeout=timeout_s)
    except queue.Empty:
        raise TimeoutError(f"no token generated for {timeout_s:.0f}s") from None


def _final(res: dict) -> dict:
    return {"finish_reason": res["finish_reason"], "completion_tokens": res["completion_tokens"]}
