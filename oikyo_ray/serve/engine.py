"""The transformers+peft engine: one base model, many adapters, mixed-adapter batches (Ray-free).

A batch may hold requests for different adapters and the base: peft's per-row `adapter_names`
runs them in one `generate` call (rows with different sampling settings form separate groups),
each LoRA layer computing all rows' adapters in two batched matmuls (`multi_lora.MixedLoRA`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch
from peft import PeftModel
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from oikyo_ray.config import ModelConfig
from oikyo_ray.eval.generate import generate, penalty_processors
from oikyo_ray.model.chat_template import stop_token_ids
from oikyo_ray.model.load import load_model, load_tokenizer
from oikyo_ray.serve.adapters import check_adapter_dir
from oikyo_ray.serve.logprobs import logprobs_of
from oikyo_ray.serve.multi_lora import MixedLoRA

BASE_ROW = "__base__"  # peft's name for "no adapter" in adapter_names


class _Cancelled(StoppingCriteria):
    """Stops `generate` at its next token once the event is set (client gone, stop string hit)."""

    def __init__(self, event: threading.Event):
        self.event, self.length = event, 0

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.length = input_ids.shape[1]  # prompt + tokens generated so far
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _nothing_generated(tokenizer, prompt: str | list[int]) -> dict:
    n = len(prompt) if isinstance(prompt, list) else len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return {"text": "", "prompt_tokens": n, "completion_tokens": 0, "finish_reason": "length", "token_ids": []}


def _pieces(streamer: TextIteratorStreamer, timeout_s: float) -> Iterator[str]:
    try:
        yield from streamer
    except queue.Empty:
        raise TimeoutError(f"no token generated for {timeout_s:.0f}s") from None


class Engine:
    # a stream whose next token takes longer than this ends with an error (and frees the engine)
    # instead of holding the model forever
    token_timeout_s: float = 60.0

    def __init__(self, model_cfg: ModelConfig, model_path: str):
        self.tokenizer = load_tokenizer(model_cfg, model_path)
        self.model = load_model(model_cfg, model_path)
        self.model.to("cuda" if torch.cuda.is_available() else "cpu")
        self.model.eval()
        self.loaded: list[str] = []  # adapters requests may use
        self._retired: set[str] = set()  # unloaded by the cache, weights not deleted yet
        self.mixed = MixedLoRA()
        self._lock = threading.RLock()  # generation and adapter (un)loading never overlap

    # adapters -------------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str) -> None:
        p = check_adapter_dir(path, name)
        with self._lock:
            self._purge()
            if name in self.loaded:
                return
            if name in self._resident():  # retired but still in the model (peft keeps its last one)
                self._retired.discard(name)
            elif not self._is_peft():
                self.model = PeftModel.from_pretrained(self.model, str(p), adapter_name=name)
            else:
                self.model.load_adapter(str(p), adapter_name=name)
            self.model.eval()
            self.mixed.install(self.model)
            self.loaded.append(name)

    def remove_adapter(self, name: str) -> None:
        """Stop serving `name` now; its weights go at once if the engine is idle, else before the
        next generation. Never waits for a running generation: the adapter cache calls this on
        the event loop, which a stream may be holding the engine for."""
        if name not in self.loaded:
            return
        self.loaded.remove(name)
        self._retired.add(name)
        if self._lock.acquire(blocking=False):
            try:
                self._purge()
            finally:
                self._lock.release()

    def _purge(self) -> None:
        """Delete retired adapters' weights (called with the lock held)."""
        for name in sorted(self._retired):
            if len(self._resident()) > 1:  # peft cannot drop its last adapter; base rows never use it
                self.model.delete_adapter(name)
                self._retired.discard(name)
                self.mixed.changed()
        if self.loaded and self._is_peft():
            self.model.set_adapter(self.loaded[0])

    def _is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    def _resident(self) -> list[str]:
        return list(self.model.peft_config) if self._is_peft() else []

    def _rows(self, adapters: list[str | None]) -> dict[str, Any]:
        """The per-row adapter argument: once the model carries any adapter, every row names its
        own, the base included, so no request runs with an adapter it did not ask for."""
        if not self._is_peft():
            return {}
        unknown = [a for a in adapters if a and a not in self.loaded]
        if unknown:
            raise KeyError(f"adapter {unknown[0]!r} is not loaded")  # the replica reloads, never runs it as base
        return {"adapter_names": [a or BASE_ROW for a in adapters]}

    # generation -----------------------------------------------------------------------------
    def generate_many(self, items: list[dict]) -> list[dict]:
        """items: {"adapter": name or None, "prompt": text or token ids, "sampling": dict}; outputs
        in order. Sampling may ask for `logprobs` (top-k count; the answer then has OpenAI's
        logprobs object) and `echo` (the prompt is part of the text and of the logprobs), and
        `max_new_tokens` 0 with echo only scores the prompt."""
        out: list[dict | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in it["sampling"].items()))
            groups.setdefault(key, []).append(i)
        with self._lock:
            self._purge()
            for idx in groups.values():
                sampling = dict(items[idx[0]]["sampling"])
                top_k, echo = sampling.pop("logprobs", None), sampling.pop("echo", False)
                prompts = [items[i]["prompt"] for i in idx]
                extra = self._rows([items[i]["adapter"] for i in idx])
                if sampling["max_new_tokens"] > 0:
                    results = generate(self.model, self.tokenizer, prompts, **sampling, **extra)
                else:
                    results = [_nothing_generated(self.tokenizer, p) for p in prompts]
                for i, res in zip(idx, results):
                    out[i] = self._with_echo_and_logprobs(items[i], res, top_k, echo)
        return out  # type: ignore[return-value]

    def _with_echo_and_logprobs(self, item: dict, res: dict, top_k: int | None, echo: bool) -> dict:
        completion = res.pop("token_ids")
        if top_k is None and not echo:
            return res
        prompt = item["prompt"]
        prompt_ids = (
            prompt if isinstance(prompt, list) else self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        )
        if top_k is not None:
            kw = self._rows([item["adapter"]])
            first = 0 if echo else len(prompt_ids)
            res["logprobs"] = logprobs_of(self.model, self.tokenizer, prompt_ids + completion, first, top_k, **kw)
        if echo:
            text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
            res["text"] = text + res["text"]
        return res

    def stream(
        self, adapter: str | None, prompt: str | list[int], sampling: dict, cancel: threading.Event | None = None
    ) -> Iterator[str | dict]:
        """Yield text pieces as they are generated (one request; holds the model meanwhile), then
        {"finish_reason", "completion_tokens"}. Setting `cancel`, closing this iterator, or a stop
        string ends generation at its next token; a generation error is raised here (never left
        blocking the stream)."""
        cancel = cancel or threading.Event()
        watch = _Cancelled(cancel)
        stops = list(sampling.get("stop") or [])
        kwargs = {
            "max_new_tokens": sampling["max_new_tokens"],
            "do_sample": sampling["temperature"] > 0,
            "eos_token_id": stop_token_ids(self.tokenizer),
            "pad_token_id": self.tokenizer.pad_token_id,
            "stopping_criteria": StoppingCriteriaList([watch]),
            "logits_processor": penalty_processors(sampling.get("presence_penalty"), sampling.get("frequency_penalty")),
        }
        if sampling["temperature"] > 0:
            kwargs.update(temperature=sampling["temperature"], top_p=sampling["top_p"])
        if isinstance(prompt, list):  # completions may send token ids
            ids = torch.tensor([prompt], device=self.model.device)
            enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        else:
            enc = self.tokenizer([prompt], return_tensors="pt", add_special_tokens=False).to(self.model.device)
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=self.token_timeout_s
        )
        failed: list[BaseException] = []
        with self._lock:
            self._purge()
            kwargs.update(self._rows([adapter]))
            if sampling.get("seed") is not None:
                torch.manual_seed(sampling["seed"])
            worker = threading.Thread(target=self._generate_into, args=(enc, streamer, kwargs, failed), daemon=True)
            worker.start()
            text, cut = "", None
            try:
                for piece in _pieces(streamer, self.token_timeout_s):
                    text += piece
                    cut = min((text.index(s) for s in stops if s and s in text), default=None)
                    if cut is not None:
                        yield piece[: max(0, len(piece) - (len(text) - cut))]
                        break
                    if piece:
                        yield piece
            finally:  # done, stop string, consumer gone or timed out: generation stops now
                cancel.set()
                worker.join(timeout=self.token_timeout_s)
        if failed:
            raise failed[0]
        generated = max(0, watch.length - enc["input_ids"].shape[1])
        at_limit = generated >= sampling["max_new_tokens"]
        yield {
            "finish_reason": "length" if at_limit and cut is None else "stop",
            "completion_tokens": generated if at_limit or cut is not None else max(0, generated - 1),  # not the EOS
        }

    def _generate_into(self, enc, streamer, kwargs, failed: list) -> None:
        try:
            with torch.no_grad():
                self.model.generate(**enc, streamer=streamer, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the stream's thread
            failed.append(e)
            streamer.end()  # the stream's reader must not wait for tokens that will never come

    def healthy(self) -> bool:
        """A one-token forward pass works (skipped while busy: a busy engine is a working one)."""
        if not self._lock.acquire(blocking=False):
            return True
        try:
            with torch.no_grad():
                ids = torch.tensor([[self.tokenizer.pad_token_id or 0]], device=self.model.device)
                logits = self.model(input_ids=ids, **self._rows([None])).logits
            return bool(torch.isfinite(logits).all())
        finally:
            self._lock.release()
