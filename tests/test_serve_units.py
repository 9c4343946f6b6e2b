"""Serve pieces without Ray: the mixed batcher, the model replica, adapter name/path safety, auth,
the engine."""

import asyncio
import time
from pathlib import Path

import pytest

from oikyo_ray.config import load_config
from oikyo_ray.serve.adapters import AdapterNotFound, BadAdapterName, resolve_adapter, validate_name
from oikyo_ray.serve.auth import authorized, load_token
from oikyo_ray.serve.batcher import MixedBatcher
from oikyo_ray.serve.replica import ModelReplica, load_adapter


def test_batcher_mixes_and_keeps_order():
    seen = []

    async def run(items):
        seen.append(list(items))
        await asyncio.sleep(0.05)
        return [f"out-{i}" for i in items]

    async def main():
        b = MixedBatcher(run, max_size=4, wait_s=0.02)
        first = await b.submit("solo")  # idle: runs alone at once
        outs = await asyncio.gather(*[b.submit(i) for i in range(6)])
        return first, outs

    first, outs = asyncio.run(main())
    assert first == "out-solo" and outs == [f"out-{i}" for i in range(6)]
    assert seen[0] == ["solo"] and max(len(s) for s in seen[1:]) == 4 and sum(len(s) for s in seen) == 7


def test_batcher_errors_reach_every_waiter():
    async def run(items):
        raise RuntimeError("boom")

    async def main():
        b = MixedBatcher(run, max_size=4, wait_s=0.01)
        return await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)

    assert [str(e) for e in asyncio.run(main())] == ["boom", "boom"]


class FakeEngine:
    """The Engine's interface; answers name the adapter, calls are slow enough for requests to queue."""

    def __init__(self):
        self.loaded: list[str] = []

    def add_adapter(self, name, path):
        self.loaded.append(name)

    def remove_adapter(self, name):
        self.loaded.remove(name)

    def generate_many(self, items):
        time.sleep(0.05)
        missing = [it["adapter"] for it in items if it["adapter"] and it["adapter"] not in self.loaded]
        assert not missing, f"ran with adapters not loaded: {missing}"  # the real engine refuses these too
        if any(it["sampling"].get("poison") for it in items):
            raise RuntimeError("probability tensor contains inf")  # as torch says for overflowing sampling
        return [{"text": f"{it['adapter']}:{it['prompt']}"} for it in items]

    def stream(self, adapter, prompt, sampling, cancel=None):
        yield from (f"{adapter}:", prompt)
        self.generated = 0
        for i in range(sampling.get("more", 0)):  # a long generation, stopped by `cancel` or close()
            if cancel is not None and cancel.is_set():
                return
            time.sleep(0.01)
            self.generated += 1
            yield f" {i}"
        if sampling.get("fail_midway"):
            raise RuntimeError("generation failed")


def test_a_poisoned_row_fails_alone_in_its_batch(tmp_path, caplog):
    batches: list = []
    replica, _, _ = _replica(tmp_path, batches=batches)

    async def main():
        await replica.generate(None, "warm", {})  # the next requests then queue into one batch
        sampling = [{"poison": i == 3} for i in range(8)]
        return await asyncio.gather(*[replica.generate("a0", f"p{i}", s) for i, s in enumerate(sampling)])

    outs = asyncio.run(main())
    assert [o.get("text") for o in outs] == [f"a0:p{i}" if i != 3 else None for i in range(8)]
    assert outs[3]["error"]["status"] == 500 and "inf" not in str(outs[3])  # no raw exception text
    assert any(len(a) > 1 for a, _ in batches) and "retrying its rows one by one" in caplog.text
    assert replica.pending == 0


def test_stream_error_ends_with_an_error_and_frees_the_replica(tmp_path):
    replica, _, _ = _replica(tmp_path)

    async def main():
        broken = [p async for p in replica.stream(None, "p", {"more": 2, "fail_midway": True})]
        return broken, await replica.generate(None, "after", {})

    broken, after = asyncio.run(main())
    assert broken[:4] == ["None:", "p", " 0", " 1"] and broken[4]["error"]["status"] == 500
    assert after == {"text": "None:after"} and replica.pending == 0


def test_leaving_a_stream_stops_its_generation(tmp_path):
    replica, engine, _ = _replica(tmp_path)

    async def main():
        stream = replica.stream(None, "p", {"more": 1000})
        got = [await anext(stream) for _ in range(3)]
        await stream.aclose()  # the client disconnected
        await asyncio.sleep(0.2)
        return got

    assert asyncio.run(main()) == ["None:", "p", " 0"]
    assert engine.generated < 100  # stopped at once, not after all 1000 tokens
    assert replica.pending == 0


def test_a_batch_with_more_adapters_than_cache_slots_runs_in_parts(tmp_path):
    """A one-slot LRU cache: loading a1 evicts a0, so a batch asking for both must run in parts."""
    batches: list = []
    root = _adapter_root(tmp_path)
    cfg = load_config(None, [f"serve.adapter_root={root}"]).serve
    engine, cache = FakeEngine(), {}

    async def lru_of_one(name):
        if name not in cache:
            cache.clear()  # evicts: the lease is dropped and unloads its adapter
            cache[name] = await load_adapter(engine, name, cfg, str(tmp_path))
        return cache[name]

    replica = ModelReplica(engine, lru_of_one, 8, 0.05, lambda a, s: batches.append(a), max_adapters=1)

    async def main():
        await replica.generate(None, "warm", {})
        names = ["a0", "a1", None, "a0", "a1"]
        return await asyncio.gather(*[replica.generate(a, f"p{i}", {}) for i, a in enumerate(names)])

    outs = asyncio.run(main())
    assert [o["text"] for o in outs] == ["a0:p0", "a1:p1", "None:p2", "a0:p3", "a1:p4"]
    assert all(len({a for a in b if a}) <= 1 for b in batches), batches


def test_stalled_only_with_work_waiting(tmp_path):
    replica, _, _ = _replica(tmp_path)
    assert not replica.stalled(0.0)  # idle for any time is fine
    replica.pending, replica.last_progress = 1, time.monotonic() - 5
    assert replica.stalled(1.0) and not replica.stalled(10.0)


def test_batcher_skips_requests_whose_caller_left():
    ran = []

    async def run(items):
        ran.append(list(items))
        await asyncio.sleep(0.05)
        return items

    async def main():
        b = MixedBatcher(run, max_size=8, wait_s=0.05)
        first = asyncio.create_task(b.submit("busy"))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(b.submit("gone"))
        kept = asyncio.create_task(b.submit("kept"))
        await asyncio.sleep(0.01)
        gone.cancel()
        return await first, await kept

    assert asyncio.run(main()) == ("busy", "kept")
    assert ran == [["busy"], ["kept"]]


def _adapter_root(tmp_path) -> Path:
    root = tmp_path / "root"
    for name in ("a0", "a1"):
        (root / name).mkdir(parents=True)
        (root / name / "adapter_config.json").write_text("{}")
        (root / name / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    return root


def _replica(tmp_path, acquire=None, batches=None):
    """A replica over FakeEngine with a plain dict as the adapter cache (Serve's is an LRU)."""
    engine, cache = FakeEngine(), {}
    cfg = load_config(None, [f"serve.adapter_root={_adapter_root(tmp_path)}"]).serve

    async def cached(name):
        if name not in cache:
            cache[name] = await load_adapter(engine, name, cfg, str(tmp_path))
        return cache[name]

    on_batch = (lambda adapters, seconds: batches.append((adapters, seconds))) if batches is not None else None
    return ModelReplica(engine, acquire or cached, 8, 0.05, on_batch), engine, cache


def test_replica_batches_adapters_together_and_reloads_evicted_ones(tmp_path):
    batches: list = []
    replica, engine, cache = _replica(tmp_path, batches=batches)

    async def main():
        first = await replica.generate("a0", "p", {})  # idle: runs at once, alone
        del cache["a0"]  # the cache evicts a0: the lease unloads it ...
        assert engine.loaded == []
        return first, await asyncio.gather(
            *[replica.generate(a, f"p{i}", {}) for i, a in enumerate(["a0", "a1", None, "a1"])]
        )

    first, outs = asyncio.run(main())
    assert first == {"text": "a0:p"} and [o["text"] for o in outs] == ["a0:p0", "a1:p1", "None:p2", "a1:p3"]
    assert sorted(engine.loaded) == ["a0", "a1"]  # ... and it is loaded again for its next request
    assert [a for a, _ in batches][0] == ["a0"] and any(len(set(a)) >= 2 for a, _ in batches[1:]), batches
    assert sum(len(a) for a, _ in batches) == 5 and all(s >= 0.05 for _, s in batches)


def test_replica_errors_are_dicts_without_paths(tmp_path, caplog):
    replica, _, _ = _replica(tmp_path)

    async def broken(name):
        raise OSError(f"download of {tmp_path}/secret failed")

    async def main():
        return (
            await replica.generate("missing", "p", {}),
            await replica.generate("escape", "p", {}),
            [p async for p in replica.stream("nope", "p", {})],
            [p async for p in replica.stream("a1", "p", {})],
            await _replica(tmp_path / "b", acquire=broken)[0].generate("a0", "p", {}),
        )

    missing, escape, stream_missing, streamed, internal = asyncio.run(main())
    assert missing["error"] == {"status": 404, "message": "model 'missing' not found", "type": "model_not_found"}
    assert escape["error"]["status"] == 400 and "outside the adapter root" in escape["error"]["message"]
    assert stream_missing == [
        {"error": {"status": 404, "message": "model 'nope' not found", "type": "model_not_found"}}
    ]
    assert streamed == ["a1:", "p"]
    assert internal["error"]["status"] == 500 and "secret" not in str(internal)
    assert str(tmp_path) not in str([missing, escape, internal])
    assert "download of" in caplog.text and "resolves outside the adapter root" in caplog.text  # the operator sees why


@pytest.mark.parametrize("name", ["../x", "a/b", "/etc", ".hidden", "", "a" * 200, "x..y"])
def test_adapter_names_cannot_be_paths(name):
    with pytest.raises(BadAdapterName):
        validate_name(name)


def test_adapter_resolution_stays_in_root(tmp_path):
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    (root / "ok" / "adapter_config.json").write_text("{}")
    (root / "ok" / "adapter_model.safetensors").write_bytes(b"")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    assert resolve_adapter("ok", {}, str(root), str(tmp_path)) == (root / "ok").resolve()
    with pytest.raises(BadAdapterName, match="outside"):
        resolve_adapter("link", {}, str(root), str(tmp_path))
    with pytest.raises(AdapterNotFound):
        resolve_adapter("missing", {}, str(root), str(tmp_path))
    with pytest.raises(AdapterNotFound):
        resolve_adapter("ok", {}, None, str(tmp_path))  # no root configured


def test_token_from_env_or_file_never_config(tmp_path, monkeypatch):
    monkeypatch.delenv("OIKYO_API_TOKEN", raising=False)
    cfg = load_config(None).serve
    with pytest.raises(Exception, match="no token is set"):
        load_token(cfg)
    f = tmp_path / "t"
    f.write_text("from-file\n")
    assert load_token(load_config(None, [f"serve.token_file={f}"]).serve) == "from-file"
    monkeypatch.setenv("OIKYO_API_TOKEN", "from-env")
    assert load_token(load_config(None, [f"serve.token_file={f}"]).serve) == "from-env"
    assert load_token(load_config(None, ["serve.auth=false"]).serve) is None
    assert authorized("s3cret", "s3cret") and not authorized("s3cret", "s3cre")
    assert not authorized("s3cret", None) and not authorized("s3cret", "") and authorized(None, None)
    assert not any("from-env" in str(v) for v in load_config(None).model_dump()["serve"].values())


def test_engine_mixed_batch_equals_single_requests(tiny_model, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from oikyo_ray.serve.engine import Engine

    for i in range(2):
        torch.manual_seed(i)
        get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model),
            LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
        ).save_pretrained(tmp_path / f"a{i}")
    eng = Engine(load_config(None).model, str(tiny_model))
    eng.add_adapter("a0", str(tmp_path / "a0"))
    eng.add_adapter("a1", str(tmp_path / "a1"))
    s = {"max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []}
    items = [{"adapter": a, "prompt": "Capital of Peru?", "sampling": s} for a in ("a0", "a1", None)]
    alone = [eng.generate_many([it])[0]["text"] for it in items]
    together = [o["text"] for o in eng.generate_many(items)]
    assert together == alone and len(set(alone)) == 3
    streamed = list(eng.stream("a1", "Capital of Peru?", s))
    assert "".join(streamed[:-1]) == alone[1] and streamed[-1]["finish_reason"] == "length"
    assert streamed[-1]["completion_tokens"] == 5
    eng.remove_adapter("a0")
    assert eng.loaded == ["a1"] and eng.generate_many([items[1]])[0]["text"] == alone[1]
    assert eng.healthy()


def test_engine_stream_that_fails_raises_and_frees_the_engine(tiny_model):
    import threading

    from oikyo_ray.serve.engine import Engine

    eng = Engine(load_config(None).model, str(tiny_model))
    eng.token_timeout_s = 30
    s = {"max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []}
    real_generate = eng.model.generate

    def broken(**kw):
        raise RuntimeError("probability tensor contains either inf, nan or element < 0")

    eng.model.generate = broken
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="probability tensor"):
        list(eng.stream(None, "Capital of Peru?", s))
    assert time.monotonic() - t0 < 10  # raised, not waited out
    eng.model.generate = real_generate
    assert len("".join(p for p in eng.stream(None, "Capital of Peru?", s) if isinstance(p, str))) > 0  # lock released

    cancel, long = threading.Event(), dict(s, max_new_tokens=200)
    pieces = []
    for piece in eng.stream(None, "Capital of Peru?", long, cancel):
        if isinstance(piece, str):
            pieces.append(piece)
        cancel.set()  # the caller leaves after the first piece: generation stops at the next token
    assert 1 <= len(pieces) <= 3


def test_batched_mixed_lora_equals_peft(tiny_model, tmp_path):
    """The engine's mixed-adapter layers (two bmm per layer, ranks zero-padded) give peft's own
    per-adapter sub-batch results: adapters of different ranks and the base in one batch."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from oikyo_ray.serve.multi_lora import MixedLoRA

    for i, r in enumerate((4, 8)):
        torch.manual_seed(i)
        get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model),
            LoraConfig(r=r, lora_alpha=2 * r + i, target_modules="all-linear", init_lora_weights=False),
        ).save_pretrained(tmp_path / f"a{i}")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "a0", adapter_name="a0"
    )
    model.load_adapter(tmp_path / "a1", adapter_name="a1")
    model.eval()
    ids = torch.randint(3, 200, (5, 9), generator=torch.Generator().manual_seed(0))
    names = ["a1", "__base__", "a0", "a1", "a0"]
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=names).logits
        mixed = MixedLoRA()
        mixed.install(model)
        got = model(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[0] - got[2]).abs().max() > 1e-3  # the adapters differ, so the check can fail
    layer = next(m for m in model.modules() if "_oikyo_stack" in m.__dict__)
    assert layer._oikyo_stack.A.shape[:2] == (3, 8)  # base slot + 2 adapters, rank padded to 8
    model.delete_adapter("a0")
    mixed.changed()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids[:2], adapter_names=names[:2]).logits, want[:2], rtol=1e-5, atol=1e-5
        )


def test_vllm_export_is_a_valid_serve_config(tmp_path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from oikyo_ray.cli import main
    from oikyo_ray.errors import ConfigError
    from oikyo_ray.serve.vllm import vllm_serve_config

    out = tmp_path / "vllm.yaml"
    demo = Path(__file__).resolve().parent.parent / "serve" / "serve_demo.yaml"
    code = main(
        [
            "serve",
            str(demo),
            "serve.adapter_root=s3://bucket/adapters",
            "model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct",
            "serve.max_replicas=4",
            "--export-vllm",
            str(out),
        ]
    )
    assert code == 0
    doc = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(doc)
    app = doc["applications"][0]
    llm = app["args"]["llm_configs"][0]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    assert llm["lora_config"]["dynamic_lora_loading_path"] == "s3://bucket/adapters"
    assert llm["deployment_config"]["autoscaling_config"]["max_replicas"] == 4
    assert "token" not in out.read_text().lower()  # no secret travels in the generated file
    with pytest.raises(ConfigError, match="s3://"):
        vllm_serve_config(load_config(None, ["serve.adapter_root=/local/dir"]))
    # vLLM's app checks no API key: never exported bound beyond loopback, whatever serve.auth says
    for host in ("0.0.0.0", "10.0.0.5"):
        with pytest.raises(ConfigError, match="unauthenticated vLLM endpoint"):
            vllm_serve_config(load_config(None, [f"serve.host={host}"]))
    assert main(["serve", str(demo), "serve.host=0.0.0.0", "--export-vllm", str(tmp_path / "open.yaml")]) == 2
    assert not (tmp_path / "open.yaml").exists()


def test_serve_run_builder_refuses_auth_off():
    """Under `serve run`/`serve deploy` Serve's http_options choose the bind address, so serve.host's
    loopback check cannot hold: auth off is refused there, before anything is deployed."""
    from oikyo_ray.errors import ConfigError
    from oikyo_ray.serve.ray_serve import build_app

    with pytest.raises(ConfigError, match="serve.auth=false is refused"):
        build_app({"overrides": ["serve.auth=false", "serve.host=127.0.0.1"]})


def test_engine_logprobs_and_echo_equal_the_model_in_process(tiny_model, tmp_path):
    """OpenAI completions' `logprobs`/`echo` (what lm-eval's loglikelihood tasks sum) are the model's
    own log-softmax, for the base and through the mixed-adapter path for an adapter."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from oikyo_ray.serve.engine import Engine

    torch.manual_seed(0)
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    ).save_pretrained(tmp_path / "a0")
    eng = Engine(load_config(None).model, str(tiny_model))
    eng.add_adapter("a0", str(tmp_path / "a0"))
    ids = eng.tokenizer("Capital of Peru? Lima", add_special_tokens=False)["input_ids"]
    s = {"max_new_tokens": 1, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": [], "logprobs": 1, "echo": True}
    items = [{"adapter": a, "prompt": ids, "sampling": s} for a in (None, "a0")]
    outs = eng.generate_many(items)

    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "a0").eval()
    for model, out in zip((base, tuned), outs):
        lp = out["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None  # prompt + 1 new
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        want = [float(ref[p - 1, ids[p]]) for p in range(1, len(ids))]
        assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1 : len(ids)], want)) < 1e-4
        greedy = [max(top.values()) == tok for tok, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:])]
        assert greedy[-1]  # the generated token was the argmax (temperature 0)
        assert out["text"].startswith(eng.tokenizer.decode(ids)) and lp["text_offset"][0] == 0
    assert outs[0]["logprobs"]["token_logprobs"] != outs[1]["logprobs"]["token_logprobs"]

    scored = eng.generate_many([{"adapter": None, "prompt": ids, "sampling": dict(s, max_new_tokens=0)}])[0]
    assert (
        scored["completion_tokens"] == 0
        and scored["logprobs"]["token_logprobs"] == outs[0]["logprobs"]["token_logprobs"][: len(ids)]
    )
    plain = dict(s, logprobs=None, echo=False, max_new_tokens=4)
    by_ids, by_text = eng.generate_many(
        [
            {"adapter": None, "prompt": ids, "sampling": plain},
            {"adapter": None, "prompt": "Capital of Peru? Lima", "sampling": plain},
        ]
    )
    assert by_ids == by_text and "logprobs" not in by_ids and "token_ids" not in by_ids


def test_engine_adapter_eviction_is_never_stale(tiny_model, tmp_path):
    """Evicting the only adapter leaves base requests on the bare base; evicting one while a stream
    uses it neither blocks the caller nor changes that stream."""
    import threading

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from oikyo_ray.serve.engine import Engine

    torch.manual_seed(0)
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    ).save_pretrained(tmp_path / "a0")
    s = {"max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []}
    eng = Engine(load_config(None).model, str(tiny_model))
    base = eng.generate_many([{"adapter": None, "prompt": "Capital of Peru?", "sampling": s}])[0]["text"]
    eng.add_adapter("a0", str(tmp_path / "a0"))
    tuned = eng.generate_many([{"adapter": "a0", "prompt": "Capital of Peru?", "sampling": s}])[0]["text"]
    assert tuned != base
    eng.remove_adapter("a0")  # the only slot: peft keeps its weights, base rows must not use them
    assert eng.generate_many([{"adapter": None, "prompt": "Capital of Peru?", "sampling": s}])[0]["text"] == base
    with pytest.raises(KeyError, match="not loaded"):
        eng.generate_many([{"adapter": "a0", "prompt": "Capital of Peru?", "sampling": s}])

    eng.add_adapter("a0", str(tmp_path / "a0"))
    long = dict(s, max_new_tokens=40)
    alone = "".join(p for p in eng.stream("a0", "Capital of Peru?", long) if isinstance(p, str))
    pieces, took = [], []

    def evict():
        t0 = time.monotonic()
        eng.remove_adapter("a0")
        took.append(time.monotonic() - t0)

    for piece in eng.stream("a0", "Capital of Peru?", long):
        if not pieces:
            threading.Thread(target=evict).start()
            time.sleep(0.05)
            assert took and took[0] < 0.05  # returned while the stream still held the engine
        if isinstance(piece, str):
            pieces.append(piece)
    assert "".join(pieces) == alone and eng.loaded == []


def test_metric_model_labels_are_bounded():
    from oikyo_ray.serve.labels import UNKNOWN, ModelLabels

    label = ModelLabels({"base", "static"}, most=4)
    assert label("base", 400) == "base" and label("static", 200) == "static"
    assert [label(f"made-up-{i}", 404) for i in range(1000)] == [UNKNOWN] * 1000  # never a new series
    assert label("found", 200) == "found" and label("found", 500) == "found"  # answered once: known
    assert label("another", 200) == "another" and label("one-too-many", 200) == UNKNOWN  # at most 4


def test_tool_calls_are_read_back_from_the_models_text():
    from oikyo_ray.serve.tool_calls import ToolCallStream, prefix, split

    names = {"get_weather", "search"}
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>'
    content, calls = split(text, names)
    assert content == "Let me check." and len(calls) == 1
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Lima"}'}
    two = '<tool_call>\n[{"name": "search", "arguments": "{}"}, {"name": "get_weather", "arguments": {}}]\n</tool_call>'
    assert [c["function"]["name"] for c in split(two, names)[1]] == ["search", "get_weather"]
    assert split(two, names)[0] is None
    for bad in (
        '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
        "<tool_call>\n{not json\n</tool_call>",
    ):
        assert split(bad, names) == (bad, [])  # not a call of an offered tool: the client sees the text
    assert split("no calls here", names) == ("no calls here", [])

    # streamed: content flows at once, a possible tag start is held, a call comes out when it closes
    s = ToolCallStream(names)
    out = [
        s.feed(p)
        for p in ["Let me", " check.<tool", '_call>\n{"name": "get_weather",', ' "arguments": {}}\n</tool_call>', " ok"]
    ]
    assert [c for c, _ in out] == ["Let me", " check.", "", "", " ok"]
    assert [len(k) for _, k in out] == [0, 0, 0, 1, 0]
    assert ToolCallStream(names).feed("a <b>")[0] == "a <b>"  # not our tag: not held
    unclosed = ToolCallStream(names)
    assert unclosed.feed('<tool_call>\n{"name": "search", "arguments": {"q": 1}}') == ("", [])
    assert unclosed.finish()[1][0]["function"]["name"] == "search"  # generation stopped at the close tag

    # tool_choice: the assistant turn starts inside a call, so the model continues one
    assert prefix("auto") == prefix("none") == prefix(None) == ""
    named = prefix({"type": "function", "function": {"name": "search"}})
    assert split(named + '{"q": "x"}}\n</tool_call>', names)[1][0]["function"] == {
        "name": "search",
        "arguments": '{"q": "x"}',
    }
    assert (
        split(prefix("required") + '{"name": "search", "arguments": {}}', names)[1][0]["function"]["name"] == "search"
    )


TRACED = "<think>\nfirst a, then b\n\n</think>\n\nThe answer: <think> is a tag."


@pytest.mark.parametrize(
    "text, parts",
    [
        (TRACED, ("first a, then b", "The answer: <think> is a tag.")),  # a later <think> is content
        ("  <think>x</think>y", ("x", "y")),
        ("<think>\nran out of tokens while thi", ("ran out of tokens while thi", "")),
        ("<think>\n</think>\n\nok", ("", "ok")),
        (" plain <think>answer</think>", (None, " plain <think>answer</think>")),
        ("<thin", (None, "<thin")),
        ("", (None, "")),
    ],
)
def test_reasoning_trace_is_split_whole_and_streamed_alike(text, parts):
    """`split` reads a trace that opens an answer; the stream gives the same two texts however the
    answer is cut into pieces (one character at a time, in threes, whole)."""
    import random

    from oikyo_ray.model.reasoning import ReasoningStream, answer, split

    assert split(text) == parts and answer(text) == parts[1]
    rng = random.Random(0)
    cuts = [list(text), [text[i : i + 3] for i in range(0, len(text), 3)], [text]]
    cuts.append([])  # random cuts
    i = 0
    while i < len(text):
        n = rng.randint(1, 6)
        cuts[-1].append(text[i : i + n])
        i += n
    for pieces in cuts:
        s, trace, content = ReasoningStream(), [], []
        for p in pieces:
            r, c = s.feed(p)
            trace.append(r)
            content.append(c)
            assert "<think>" not in r and "</think>" not in r
        r, c = s.finish()
        assert ("".join([*trace, r]), "".join([*content, c])) == ((parts[0] or ""), parts[1]), pieces


def test_chat_message_returns_the_trace_apart_and_reads_calls_after_it():
    from oikyo_ray.serve.protocol import chat_message

    call = '<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_call>'
    out = {"text": "<think>\nlook it up\n</think>\n\n" + call, "finish_reason": "stop"}
    message, finish = chat_message(out, {"search"}, reasoning=True)
    assert message["reasoning_content"] == "look it up" and message["content"] is None and finish == "tool_calls"
    assert message["tool_calls"][0]["function"] == {"name": "search", "arguments": '{"q": "x"}'}
    plain, _ = chat_message({"text": TRACED, "finish_reason": "length"}, set(), reasoning=True)
    assert plain == {
        "role": "assistant",
        "content": "The answer: <think> is a tag.",
        "reasoning_content": "first a, then b",
    }
    assert chat_message({"text": TRACED, "finish_reason": "stop"}, set())[0] == {"role": "assistant", "content": TRACED}
    assert "reasoning_content" not in chat_message({"text": "hi", "finish_reason": "stop"}, set(), reasoning=True)[0]


def test_penalties_follow_openais_rule_in_batches_and_streams(tiny_model):
    import torch

    from oikyo_ray.eval.generate import OpenAIPenalties, generate
    from oikyo_ray.serve.engine import Engine

    scores, pen = torch.zeros(1, 5), OpenAIPenalties(presence=0.5, frequency=0.25)
    assert pen(torch.tensor([[4, 4]]), scores).tolist() == [[0.0] * 5]  # the first call sees the prompt
    # prompt [4, 4] is not counted: 1 was generated three times, 3 once
    assert pen(torch.tensor([[4, 4, 1, 1, 1, 3]]), scores).tolist() == [[0.0, -1.25, 0.0, -0.75, 0.0]]

    eng = Engine(load_config(None).model, str(tiny_model))
    ids = eng.tokenizer("Capital of Peru?", add_special_tokens=False)["input_ids"]

    def by_hand(presence: float, frequency: float, steps: int) -> list[int]:
        seq, out = list(ids), []
        with torch.no_grad():
            for _ in range(steps):
                logits = eng.model(input_ids=torch.tensor([seq])).logits[0, -1].clone()
                for t in set(out):
                    logits[t] -= frequency * out.count(t) + presence
                out.append(int(logits.argmax()))
                seq.append(out[-1])
        return out

    plain = generate(eng.model, eng.tokenizer, [ids], max_new_tokens=12)[0]["token_ids"]
    assert len(set(plain)) < len(plain)  # the greedy answer repeats tokens: penalties must change it
    s = {"max_new_tokens": 12, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []}
    for presence, frequency in ((2.0, 0.0), (0.0, 1.5), (-1.0, 0.5)):
        want = by_hand(presence, frequency, 12)
        res = generate(eng.model, eng.tokenizer, [ids], 12, presence_penalty=presence, frequency_penalty=frequency)
        assert res[0]["token_ids"] == want[: len(res[0]["token_ids"])]
        pen = dict(s, presence_penalty=presence, frequency_penalty=frequency)
        batched = eng.generate_many([{"adapter": None, "prompt": "Capital of Peru?", "sampling": pen}])[0]["text"]
        streamed = "".join(p for p in eng.stream(None, "Capital of Peru?", pen) if isinstance(p, str))
        assert streamed == batched == res[0]["text"]
    assert by_hand(2.0, 0.0, 12) != plain


def test_engine_streams_token_id_prompts(tiny_model):
    from oikyo_ray.serve.engine import Engine

    eng = Engine(load_config(None).model, str(tiny_model))
    ids = eng.tokenizer("Capital of Peru?", add_special_tokens=False)["input_ids"]
    s = {"max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []}
    whole = eng.generate_many([{"adapter": None, "prompt": ids, "sampling": s}])[0]
    pieces = list(eng.stream(None, ids, s))
    assert "".join(pieces[:-1]) == whole["text"] and whole["text"]
    assert pieces[-1] == {"finish_reason": whole["finish_reason"], "completion_tokens": whole["completion_tokens"]}
