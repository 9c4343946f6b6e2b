"""The continuously batching engine (Ray-free) on the tiny model: requests join and leave the
running batch between steps with the same greedy answers as plain `generate`, adapters mix per
row, a short request is not held by a long one, cancel/timeouts/bad sampling free only their row.
Most tests drive the scheduler step by step (`autostart = False`) so joins happen at known steps."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from oikyo_ray.config import load_config
from oikyo_ray.eval.generate import generate
from oikyo_ray.serve.continuous import ContinuousEngine
from oikyo_ray.serve.engine import Engine

PROMPTS = ["Capital of Peru?", "Write a long story about a dog, a cat and a very old boat", "hi", "2+2?"]


def _s(n: int, **kw) -> dict:
    return {"max_new_tokens": n, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": [], **kw}


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    for i, r in enumerate((4, 8)):
        torch.manual_seed(i)
        get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model),
            LoraConfig(r=r, target_modules="all-linear", init_lora_weights=False),
        ).save_pretrained(root / f"a{i}")
    return root


@pytest.fixture
def stepped(tiny_model):
    eng = ContinuousEngine(load_config(None).model, str(tiny_model))
    eng.scheduler.autostart = False
    return eng


def _run(eng: ContinuousEngine, steps: int = 1000) -> list[int]:
    """Step until nothing is left; the running batch's size after each step."""
    sizes = []
    for _ in range(steps):
        if not eng.scheduler.rows and not eng.scheduler.waiting:
            break
        eng.scheduler.step()
        sizes.append(len(eng.scheduler.rows))
    return sizes


def test_greedy_answers_equal_generate_with_joins_at_different_steps(stepped):
    eng = stepped
    lengths = [30, 12, 25, 8]
    futs = [eng.submit(None, PROMPTS[0], _s(lengths[0]))]
    for _ in range(3):
        eng.scheduler.step()
    futs += [eng.submit(None, p, _s(n)) for p, n in zip(PROMPTS[1:3], lengths[1:3])]
    eng.scheduler.step()
    eng.scheduler.step()
    futs.append(eng.submit(None, PROMPTS[3], _s(lengths[3])))
    sizes = _run(eng)
    assert max(sizes) == 4 and sizes[-1] == 0  # all four ran together, and all left
    for p, n, fut in zip(PROMPTS, lengths, futs):
        want = generate(eng.model, eng.tokenizer, [p], n)[0]
        got = fut.result()
        assert got == {k: want[k] for k in got}, p
    assert eng.scheduler.kv is None  # the last row gone, the cache is dropped


def test_mixed_adapters_in_one_running_batch_equal_each_alone(stepped, adapters):
    eng = stepped
    eng.add_adapter("a0", str(adapters / "a0"))
    eng.add_adapter("a1", str(adapters / "a1"))
    items = [{"adapter": a, "prompt": p, "sampling": _s(16)} for a, p in zip(("a0", None, "a1", "a0"), PROMPTS)]
    alone = [Engine.generate_many(eng, [it])[0] for it in items]  # the static engine, one request each
    futs = []
    for it in items:  # one joins per step
        futs.append(eng.submit(it["adapter"], it["prompt"], it["sampling"]))
        eng.scheduler.step()
    assert {s.adapter for s in eng.scheduler.rows} == {"a0", "a1", None}
    _run(eng)
    assert [f.result() for f in futs] == alone
    assert alone[0]["text"] != Engine.generate_many(eng, [dict(items[0], adapter="a1")])[0]["text"]


def test_an_adapter_evicted_mid_row_keeps_that_row_right(stepped, adapters):
    eng = stepped
    eng.add_adapter("a0", str(adapters / "a0"))
    eng.add_adapter("a1", str(adapters / "a1"))
    item = {"adapter": "a0", "prompt": PROMPTS[0], "sampling": _s(12)}
    want = Engine.generate_many(eng, [item])[0]
    fut = eng.submit("a0", PROMPTS[0], _s(12))
    for _ in range(3):
        eng.scheduler.step()
    eng.remove_adapter("a0")  # the LRU evicts it while its row decodes
    assert "a0" not in eng.loaded and "a0" in eng._resident()  # weights kept for the running row
    _run(eng)
    assert fut.result() == want
    eng.scheduler.step()  # the row is gone: the next step purges the weights
    assert "a0" not in eng._resident()
    late = eng.submit("a0", PROMPTS[0], _s(4))
    eng.scheduler.step()
    with pytest.raises(KeyError, match="not loaded"):  # never run as the base or a stale adapter
        late.result()


def test_a_short_request_is_not_held_by_a_long_one(tiny_model):
    """In one running batch, the short request completes while the long one still decodes."""
    eng = ContinuousEngine(load_config(None).model, str(tiny_model))
    order: list[str] = []
    started = threading.Event()
    long = eng.submit(None, PROMPTS[1], _s(200), on_piece=lambda _: started.set())
    assert started.wait(30)
    short = eng.submit(None, PROMPTS[0], _s(4))
    for name, fut in (("long", long), ("short", short)):
        fut.add_done_callback(lambda _, name=name: order.append(name))
    assert short.result(timeout=30)["completion_tokens"] == 4
    assert not long.done()  # still decoding when the short one was answered
    assert long.result(timeout=60)["finish_reason"] == "length"
    assert order == ["short", "long"]


def test_cancel_frees_its_row_and_a_left_stream_too(stepped):
    eng = stepped
    cancel = threading.Event()
    gone = eng.submit(None, PROMPTS[0], _s(50), cancel=cancel)
    kept = eng.submit(None, PROMPTS[1], _s(10))
    eng.scheduler.step()
    assert len(eng.scheduler.rows) == 2 and len(eng.scheduler.kv) == 2
    cancel.set()
    eng.scheduler.step()
    assert [s.future for s in eng.scheduler.rows] == [kept] and len(eng.scheduler.kv) == 1
    assert gone.result()["finish_reason"] == "cancelled"
    _run(eng)
    assert kept.result() == Engine.generate_many(eng, [{"adapter": None, "prompt": PROMPTS[1], "sampling": _s(10)}])[0]

    eng.scheduler.autostart = True  # a stream whose consumer leaves after one piece
    stream = eng.stream(None, PROMPTS[0], _s(200))
    next(stream)
    stream.close()
    _wait(lambda: not eng.scheduler.rows)


def test_a_bad_sampling_row_fails_alone(stepped):
    eng = stepped
    # a subnormal temperature overflows the logits: torch's multinomial raises for this row only
    futs = [eng.submit(None, p, _s(8, temperature=1e-45 if i == 1 else 0.0)) for i, p in enumerate(PROMPTS)]
    _run(eng)
    with pytest.raises(RuntimeError, match="probability tensor"):
        futs[1].result()
    for i in (0, 2, 3):
        assert (
            futs[i].result()
            == Engine.generate_many(eng, [{"adapter": None, "prompt": PROMPTS[i], "sampling": _s(8)}])[0]
        )


def test_length_stop_strings_timeouts_and_streams(stepped):
    eng = stepped
    at_limit = eng.submit(None, PROMPTS[0], _s(5))
    _run(eng)
    assert at_limit.result()["finish_reason"] == "length" and at_limit.result()["completion_tokens"] == 5

    text = at_limit.result()["text"]
    stop = text[2:4]  # a stop string the greedy answer reaches: generation ends there
    cut = eng.submit(None, PROMPTS[0], _s(50, stop=[stop]))
    _run(eng)
    assert cut.result()["text"] == text[: text.index(stop)] and cut.result()["finish_reason"] == "stop"
    assert cut.result()["completion_tokens"] < 50

    late = eng.submit(None, PROMPTS[0], _s(50, timeout_s=0.0))
    _run(eng)
    with pytest.raises(TimeoutError):
        late.result()

    eng.scheduler.autostart = True
    pieces = list(eng.stream(None, PROMPTS[1], _s(12)))
    want = generate(eng.model, eng.tokenizer, [PROMPTS[1]], 12)[0]
    assert "".join(pieces[:-1]) == want["text"] and pieces[-1] == {"finish_reason": "length", "completion_tokens": 12}


def test_a_failing_model_step_fails_its_rows_and_the_engine_serves_on(tiny_model):
    eng = ContinuousEngine(load_config(None).model, str(tiny_model))
    real = eng.model.forward

    def broken(*args, **kw):
        if kw["input_ids"].shape[1] == 1:  # decoding steps fail, prefills work
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real(*args, **kw)

    eng.model.forward = broken
    with pytest.raises(RuntimeError, match="device-side assert"):
        list(eng.stream(None, PROMPTS[0], _s(5)))
    del eng.model.forward  # the class's forward again
    item = {"adapter": None, "prompt": PROMPTS[0], "sampling": _s(5)}
    assert eng.generate_many([item]) == Engine.generate_many(eng, [item]) and eng.healthy()
    assert eng.scheduler.rows == [] and eng.scheduler.kv is None


def test_async_streams_send_pieces_together_and_time_out(tiny_model, stepped):
    eng = ContinuousEngine(load_config(None).model, str(tiny_model))
    eng.stream_interval_s = 0.05

    async def streamed(prompt: str, n: int) -> list:
        return [p async for p in eng.astream(None, prompt, _s(n))]

    async def both():
        return await asyncio.gather(streamed(PROMPTS[0], 60), streamed(PROMPTS[1], 60))

    for prompt, pieces in zip(PROMPTS, asyncio.run(both())):
        want = generate(eng.model, eng.tokenizer, [prompt], 60)[0]
        assert "".join(pieces[:-1]) == want["text"] and pieces[-1]["completion_tokens"] == 60
        assert len(pieces) - 1 < 60  # tokens that came within an interval went as one message

    eng, eng.token_timeout_s = stepped, 0.2  # nothing steps it: no token ever comes
    with pytest.raises(TimeoutError, match="no token"):
        asyncio.run(streamed(PROMPTS[0], 5))
    assert eng.scheduler.waiting[0].cancel.is_set()  # the row would leave at once


def test_seeded_sampling_does_not_depend_on_the_batch(stepped):
    eng = stepped
    s = _s(10, temperature=0.9, top_p=0.9, seed=7)
    alone = eng.submit(None, PROMPTS[0], s)
    _run(eng)
    futs = [eng.submit(None, p, s) for p in PROMPTS]
    _run(eng)
    assert futs[0].result() == alone.result()


def test_replica_sends_requests_straight_to_the_scheduler(tiny_model, adapters, tmp_path):
    from oikyo_ray.serve.replica import ModelReplica, load_adapter

    eng = ContinuousEngine(load_config(None).model, str(tiny_model))
    cfg = load_config(None, [f"serve.adapter_root={adapters}"]).serve
    cache: dict = {}

    async def acquire(name):
        if name not in cache:
            cache[name] = await load_adapter(eng, name, cfg, str(tmp_path))
        return cache[name]

    steps: list = []
    replica = ModelReplica(eng, acquire, 8, 0.01, lambda a, s: steps.append(a))
    assert replica.batcher is None

    async def main():
        plain = [replica.generate(a, PROMPTS[0], _s(6)) for a in ("a0", None, "a1")]
        bad = replica.generate(None, PROMPTS[2], _s(6, temperature=1e-45))
        streamed = [p async for p in replica.stream("a1", PROMPTS[0], _s(6))]
        return await asyncio.gather(*plain, bad), streamed

    (a0, base, a1, bad), streamed = asyncio.run(main())
    assert bad["error"]["status"] == 500 and "probability" not in str(bad)
    assert len({a0["text"], base["text"], a1["text"]}) == 3
    assert "".join(streamed[:-1]) == a1["text"] and streamed[-1]["finish_reason"] == "length"
    assert any(len(set(a)) > 1 for a in steps) and replica.pending == 0


def _wait(cond, timeout_s: float = 10.0) -> None:
    import time

    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)
