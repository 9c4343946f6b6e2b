"""Retraining from a model's own traffic: the dataset built from captured answers and feedback
(SFT rows, preference pairs, redaction check, held-out live slice by prompt, replay that keeps
its splits), the policy's triggers, the challenger's bar, the init-adapter check; and the loop
end to end on a real local Ray with a real Serve app and real HTTP: shifted traffic with user
corrections, `oikyo drift` fires (report and gauge), `oikyo retrain` trains a challenger from
the champion's adapter that beats it on the held-out shifted slice without failing its gates,
and canaries it; a retrain that fails its bar deploys nothing."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from oikyo_ray.config import dump_yaml, load_config
from oikyo_ray.data.formats import normalise
from oikyo_ray.data.split import assign_split, content_hash
from oikyo_ray.errors import ConfigError, OikyoError
from oikyo_ray.registry import registry
from oikyo_ray.retrain import dataset, judge
from oikyo_ray.retrain.policy import due
from oikyo_ray.serve.redact import redact

TOKEN = "retrain-test-token-0123456789"
H = {"Authorization": f"Bearer {TOKEN}"}


def _chat(text: str) -> str:
    return json.dumps([{"role": "user", "content": text}])


def _answer(i: str, prompt: str, completion: str, **kw) -> dict:
    return {"id": i, "endpoint": "chat", "prompt": _chat(prompt), "completion": completion, "model": "bot", **kw}


def _prepared(data_dir: Path, rows: list[tuple[list[dict], dict]]) -> None:
    """Prepared splits as the data stage writes them (messages, meta, content hash)."""
    by_split: dict[str, list[dict]] = {}
    for msgs, meta in rows:
        h = content_hash(msgs)
        split = assign_split(h, 0.2, 0.2, "oikyo")
        by_split.setdefault(split, []).append({"hash": h, "messages": json.dumps(msgs), "meta": json.dumps(meta)})
    for split, part in by_split.items():
        (data_dir / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(part), data_dir / split / "part-0.parquet")


def _qa(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_dataset_from_corrections_ratings_and_comparisons(tmp_path):
    _prepared(tmp_path, [(_qa(f"What is {i} plus {i}?", str(2 * i)), {}) for i in range(40)])
    completions = [
        _answer("c1", "Capital of Peru?", "Paris"),
        _answer("c2", "Capital of Chile?", "Santiago"),
        _answer("c3", "Capital of Spain?", "Rome"),
        _answer("c4", "Capital of Spain?", "Madrid"),
        _answer("c5", "Capital of Spain?", "Madrid, Spain"),
        _answer("c6", "Mail me at ana.perez@example.com", "ok"),  # captured with redaction off
        {"id": "c7", "endpoint": "chat", "completion": "no prompt kept", "model": "bot"},  # capture.fields
        {**_answer("c8", "x", "y"), "prompt": '[{"role": "user", "content": "cut'},  # cut at max_chars
    ]
    feedback = [
        {"id": "c1", "normalized": 0.0, "correction": "Lima", "created": 1},
        {"id": "c2", "normalized": 1.0, "created": 2},
        {"id": "c3", "normalized": 0.0, "created": 3},
        {"id": "c4", "normalized": 1.0, "created": 4},
        {"id": "c5", "preferred_over": "c4", "created": 5},
        {"id": "c5", "preferred_over": "c2", "created": 6},  # another prompt: no pair
        {"id": "gone", "normalized": 1.0, "created": 7},
    ]
    cfg = load_config(None, ["retrain.replay_fraction=0.5", "retrain.live_eval_fraction=0.01"]).retrain
    sft = dataset.build(completions, feedback, tmp_path, cfg, redact)
    answers = sorted(r["messages"][-1]["content"] for r in sft.live + sft.live_eval)
    assert answers == ["Lima", "Madrid", "Santiago"]  # the correction, and the two well-rated answers
    c = sft.counts
    assert (c["dropped_redaction"], c["skipped_no_text"], c["feedback_unmatched"]) == (1, 2, 1)
    assert (c["sft_from_correction"], c["sft_from_rating"]) == (1, 2)

    pairs = dataset.build(completions, feedback, tmp_path, cfg.model_copy(update={"objective": "dpo"}), redact)
    got = sorted((r["chosen"], r["rejected"]) for r in pairs.live + pairs.live_eval)
    assert got == [("Lima", "Paris"), ("Madrid", "Rome"), ("Madrid, Spain", "Madrid")]
    assert pairs.counts["comparison_other_prompt"] == 1
    assert pairs.replay == [] and pairs.counts["replay_skipped_not_dpo"] > 0  # no pairs to replay

    # replay: half the training rows, all val and test rows, read back to the same content (split)
    kept = {s: len(dataset.load_split_rows(tmp_path, s)) for s in dataset.SPLITS}
    assert c["replay_train"] == round(kept["train"] * 0.5) and c["replay_test"] == kept["test"] > 0
    assert c["replay_val"] == kept["val"]
    originals = {r["hash"] for s in dataset.SPLITS for r in dataset.load_split_rows(tmp_path, s)}
    assert {content_hash(normalise(r)[0]) for r in sft.replay} <= originals
    files = dataset.write(sft, str(tmp_path / "out"))
    lines = Path(files["replay"]).read_text().splitlines()
    assert len(lines) == len(sft.replay) and json.loads(lines[0]) == sft.replay[0]


def test_one_prompt_never_lies_on_both_sides():
    rows = [_answer(f"c{i}", f"Question {i % 50}?", f"answer {i}") for i in range(400)]
    feedback = [{"id": r["id"], "normalized": 1.0, "created": 1} for r in rows]
    cfg = load_config(None, ["retrain.live_eval_fraction=0.3"]).retrain
    parts = dataset.build(rows, feedback, Path("/nonexistent"), cfg, None)
    prompt = lambda r: r["messages"][0]["content"]  # noqa: E731
    held = {prompt(r) for r in parts.live_eval}
    assert held and not held & {prompt(r) for r in parts.live}
    assert 0.1 < len(parts.live_eval) / 400 < 0.5


def test_policy_triggers():
    from datetime import UTC, datetime, timedelta

    cfg = load_config(None, ["retrain.min_rated_rows=100", "retrain.every_days=7"]).retrain
    since = datetime(2026, 12, 1, tzinfo=UTC)
    now = since + timedelta(days=1)
    report = {"drifted": True, "version": 3, "created": (since + timedelta(hours=1)).isoformat()}
    report["checks"] = [{"check": "script_tv", "drifted": True}, {"check": "length_ks", "drifted": False}]
    assert due(cfg, since, now, report, 3, 5) == ["drift (script_tv)"]
    assert due(cfg, since, now, report, 4, 5) == []  # a report on another version
    stale = {**report, "created": (since - timedelta(hours=1)).isoformat()}
    assert due(cfg, since, now, stale, 3, 5) == []  # written before the last retrain
    assert due(cfg, since, now, {**report, "drifted": None}, 3, 5) == []  # too few rows for a verdict
    assert due(cfg, since, now, None, 3, 100)[0].startswith("100 feedback rows")
    assert due(cfg, since, since + timedelta(days=8), None, 3, 0)[0].startswith("schedule")
    off = load_config(None, ["retrain.on_drift=false", "retrain.min_rated_rows=null"]).retrain
    assert due(off, since, now, report, 3, 10**6) == []


def test_the_challengers_bar():
    cfg = load_config(None, ["retrain.min_live_gain=0.1", "retrain.max_test_regression=0.02"]).retrain
    good = {
        "live": {"rows": 10, "champion": 4.0, "challenger": 3.0},
        "test": {"rows": 9, "champion": 2.0, "challenger": 2.03},
    }
    assert judge.verdict(good, cfg) == []
    small_gain = {**good, "live": {"rows": 10, "champion": 4.0, "challenger": 3.8}}
    assert "retrain.min_live_gain" in judge.verdict(small_gain, cfg)[0]
    forgot = {**good, "test": {"rows": 9, "champion": 2.0, "challenger": 2.2}}
    assert "it forgot" in judge.verdict(forgot, cfg)[0]
    few = {**good, "live": {"rows": 2, "champion": 4.0, "challenger": 1.0}}
    assert "retrain.min_live_eval_rows" in judge.verdict(few, cfg)[0]
    nothing = {**good, "live": {"rows": 10, "champion": None, "challenger": None}}
    assert judge.verdict(nothing, cfg)  # no figure is no pass


def test_bad_retrain_config_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="retrain.objective"):
        load_config(None, ["retrain.objective=kto"])
    with pytest.raises(ConfigError, match="retrain.canary_percent"):
        load_config(None, ["retrain.canary_percent=100"])
    with pytest.raises(ConfigError, match="init_adapter"):
        load_config(None, ["method.type=full", f"method.init_adapter={tmp_path}"])


def test_init_adapter_is_checked_before_ray(tiny_model, cache_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from oikyo_ray.model.load import load_model
    from oikyo_ray.train.checks import check_before_ray
    from oikyo_ray.train.start import load_model_to_train

    cfg = load_config(None, [f"model.cache_dir={cache_dir}"])
    with pytest.raises(OikyoError, match="no adapter_config.json"):
        check_before_ray(load_config(None, [f"method.init_adapter={tmp_path}"]))
    torch.manual_seed(0)
    peft_model = get_peft_model(load_model(cfg.model, str(tiny_model)), LoraConfig(r=4, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    wrong = load_config(None, [f"method.init_adapter={tmp_path / 'adapter'}", "method.lora.r=8"])
    with pytest.raises(OikyoError, match=r"method.lora.r: the adapter has 4, this run 8"):
        check_before_ray(wrong)
    right = load_config(
        None,
        [f"model.cache_dir={cache_dir}", f"method.init_adapter={tmp_path / 'adapter'}", "method.lora.r=4"]
        + ["method.lora.alpha=8", "method.lora.target_modules=[q_proj,v_proj]"],
    )
    check_before_ray(right)
    started = load_model_to_train(right, str(tiny_model))
    saved = {k: v for k, v in peft_model.state_dict().items() if "lora_B" in k}
    got = {k: v for k, v in started.state_dict().items() if "lora_B" in k}
    assert saved and all(torch.equal(saved[k], got[k]) for k in saved)  # not the zeros of a fresh adapter


# ------------------------------------------------------------------- the loop on Ray and Serve
CITIES = ["Peru", "Chile", "Spain", "Kenya", "Japan", "Norway", "Egypt", "Canada", "India", "Brazil"]
# long prompts in another script (what a shift looks like), answered by users' corrections
SHIFTED = "Пожалуйста, скажите, сколько будет {a} и {b} вместе, для страны {c}? "


def _english(n: int) -> list[dict]:
    rnd = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rnd.randint(1, 50), rnd.randint(1, 50)
        rows.append({"instruction": f"What is {a} plus {b}?", "output": f"{a} plus {b} is {a + b}."})
    return rows


def _shifted(i: int) -> tuple[str, str]:
    a, b, c = 1 + i % 37, 2 + i % 23, CITIES[i % len(CITIES)]
    return SHIFTED.format(a=a, b=b, c=c), f"{a} plus {b} is {a + b}."


@pytest.fixture(scope="module")
def loop(ray_session, tiny_model, cache_dir, tmp_path_factory):
    """A champion `bot` served with capture and feedback on. Its run holds real prepared data (the
    data stage on English sums) and a LoRA adapter that is still zero: what this flow needs of a
    champion is its config, data and adapter, not what it learned."""
    from peft import LoraConfig, get_peft_model
    from ray import serve

    from oikyo_ray.data.ray_data import prepare
    from oikyo_ray.model.load import load_model, resolve_model_path
    from oikyo_ray.runs.rundir import write_lineage
    from oikyo_ray.serve.ray_serve import start
    from tests.conftest import _free_port

    work = tmp_path_factory.mktemp("retrain")
    (work / "token").write_text(TOKEN)
    (work / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _english(160)))
    root = work / "runs"
    run_cfg = load_config(
        None,
        [
            f"model.cache_dir={cache_dir}",
            f"run.root={root}",
            f"data.paths=[{work / 'sums.jsonl'}]",
            "data.max_length=192",
            "method.lora.r=8",
            "train.epochs=3",
            "train.batch_size=8",
            "scaling.num_workers=1",
            "eval.max_samples=24",
            "eval.max_new_tokens=12",
            "eval.num_samples=2",
            "eval.probes=false",  # a tiny random base's probe pass rates are noise; forgetting stays a gate
        ],
    )
    model_path = resolve_model_path(run_cfg.model)
    run = root / "champion-1"
    manifest = prepare(run_cfg, model_path, run / "data")
    lora = LoraConfig(r=8, lora_alpha=run_cfg.method.lora.alpha, target_modules="all-linear")
    get_peft_model(load_model(run_cfg.model, model_path), lora).save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(dump_yaml(run_cfg))
    write_lineage(run, run_cfg, manifest, model_path)
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text(json.dumps({"passed": True, "gates": [], "tuned": {"loss": 5.0}}))
    registry.register(str(root), "bot", str(run))
    registry.set_alias(str(root), "bot", "champion", 1)

    overrides = [
        f"model.cache_dir={cache_dir}",
        f"run.root={root}",
        f"serve.port={_free_port()}",
        f"serve.token_file={work / 'token'}",
        "serve.registry_models=[bot]",
        "serve.registry_poll_s=0.5",
        "serve.cpus_per_replica=0.25",
        "serve.capture.enabled=true",
        "serve.capture.flush_s=0.5",
        "serve.capture.drift_poll_s=1",
        "serve.feedback.enabled=true",
        "drift.min_live_rows=40",
        "deploy.load.rate_per_s=4",
        "deploy.load.duration_s=2",
        "deploy.load.prompt_tokens=[8,16]",
        "deploy.load.max_tokens=[4,8]",
        "deploy.load.warmup_requests=1",
        "retrain.min_new_rows=20",
        "retrain.min_live_eval_rows=4",
        "retrain.canary_percent=50",
        "retrain.overrides=[train.epochs=4]",
    ]
    config = work / "serve.yaml"
    config.write_text(dump_yaml(load_config(None, overrides)))
    url = start(load_config(config), model_path)
    yield {"root": root, "config": config, "url": url, "run": run}
    serve.shutdown()  # the proxy holds this module's port: later modules start their own


def _ask(c: httpx.Client, url: str, prompt: str, user: str) -> httpx.Response:
    body = {"model": "bot", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "user": user}
    return c.post(f"{url}/v1/chat/completions", json={**body, "temperature": 0})


def _eventually(check, timeout_s: float = 60):
    deadline = time.time() + timeout_s
    while not (got := check()) and time.time() < deadline:
        time.sleep(0.5)
    return got


@pytest.mark.slow
@pytest.mark.ray
def test_shifted_traffic_drifts_retrains_and_the_challenger_is_canaried(loop, ray_session):
    from oikyo_ray.cli import main
    from oikyo_ray.serve.capture import read_rows
    from tests.test_serve_app import _samples

    url, root, config = loop["url"], loop["root"], str(loop["config"])
    with httpx.Client(timeout=120, headers=H) as c:
        for i in range(80):  # shifted traffic, every answer corrected by its user
            prompt, right = _shifted(i)
            user = f"user-{i % 7}"
            r = _ask(c, url, prompt, user)
            assert r.status_code == 200, r.text
            rating = {"id": r.json()["id"], "score": 1, "correction": right, "user": user}
            fb = c.post(f"{url}/v1/feedback", json=rating)
            assert fb.status_code == 202, fb.text
    cap = root / "capture"
    stored = lambda stream: len(read_rows(str(cap / stream)))  # noqa: E731
    assert _eventually(lambda: stored("feedback") == 80 and stored("completions") == 80)

    assert main(["retrain", "bot", "--config", config]) == 0  # no trigger yet: 80 < 200 rated rows, no drift
    assert not (root / "retrain").exists()
    assert main(["drift", "bot", "--config", config, "--fail-on-drift"]) == 3
    drift = json.loads((cap / "drift" / "bot" / "report.json").read_text())
    assert drift["drifted"] is True and drift["version"] == 1

    def detected() -> list[float]:
        samples = _samples(ray_session["metrics"], "ray_oikyo_drift_detected")
        return [x.value for x in samples if x.labels.get("model") == "bot"]

    assert _eventually(lambda: detected() == [1.0]), detected()

    assert main(["retrain", "bot", "--config", config]) == 0
    (stamp,) = [p for p in (root / "retrain" / "bot").iterdir()]
    report = json.loads((stamp / "report.json").read_text())
    assert report["outcome"] == "canaried" and report["reasons"][0].startswith("drift"), report
    live, test = report["figures"]["live"], report["figures"]["test"]
    assert live["rows"] >= 4 and live["challenger"] < 0.7 * live["champion"], report["figures"]  # it learned
    assert test["rows"] > 0 and test["challenger"] <= test["champion"] * 1.02, report["figures"]
    run = Path(report["run"])
    assert json.loads((run / "eval" / "report.json").read_text())["passed"] is True  # its own gates
    lineage = json.loads((run / "lineage.json").read_text())["retrain"]
    assert lineage["parent"]["version"] == 1 and lineage["parent"]["run"] == str(loop["run"])
    assert lineage["dataset"]["live_rows"] >= 20 and lineage["dataset"]["replay_test"] > 0
    data = {
        Path(p).stem: [json.loads(x) for x in Path(p).read_text().splitlines()]
        for p in lineage["dataset"]["files"].values()
    }
    prompt = lambda r: r["messages"][0]["content"]  # noqa: E731
    assert not {prompt(r) for r in data["live"]} & {prompt(r) for r in data["live_eval"]}  # held out
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    champion_test = json.loads((loop["run"] / "data" / "manifest.json").read_text())["counts"]["test"]
    assert manifest["counts"]["test"] >= champion_test  # the champion's test rows stayed in test

    state = registry.load(str(root), "bot")
    assert state.aliases == {"champion": 1, "challenger": 2} and state.traffic == {"champion": 50.0, "challenger": 50.0}
    assert state.versions[2]["parent"]["version"] == 1 and state.versions[2]["staging"][-1]["passed"] is True
    answered = set()
    with httpx.Client(timeout=120, headers=H) as c:
        for i in range(40):
            if len(answered) == 2:
                break
            r = _ask(c, url, "Hello", f"canary-user-{i}")
            assert r.status_code == 200, r.text
            answered.add(r.headers["x-oikyo-model"])
            time.sleep(0.2)
    assert answered == {"bot-v1", "bot-v2"}  # the challenger takes its share live


@pytest.mark.slow
@pytest.mark.ray
def test_a_retrain_that_fails_its_bar_deploys_nothing(loop):
    """Forced (nothing is due since the last retrain), on DPO pairs (each correction over the
    answer it corrects), one step: the challenger cannot beat the champion by 90%."""
    from oikyo_ray.cli import main

    root, config = loop["root"], str(loop["config"])
    before = registry.load(str(root), "bot")
    assert main(["retrain", "bot", "--config", config]) == 0  # not due
    assert len(list((root / "retrain" / "bot").iterdir())) == 1
    overrides = ["retrain.objective=dpo", "retrain.min_live_gain=0.9"]
    overrides.append("retrain.overrides=[train.max_steps=1,eval.enabled=false]")
    assert main(["retrain", "bot", "--config", config, "--force", *overrides]) == 4
    reports = sorted((root / "retrain" / "bot").iterdir())
    report = json.loads((reports[-1] / "report.json").read_text())
    assert report["outcome"] == "failed" and "deployed" not in report
    assert report["dataset"]["pairs_from_correction"] == 80 and report["dataset"]["replay_rows"] == 0  # no pairs
    trained = load_config(Path(report["run"]) / "config.yaml")
    assert trained.method.objective == "dpo" and trained.method.init_adapter == str(loop["run"] / "adapter")
    text = "\n".join(report["failures"])
    assert "retrain.min_live_gain" in text and "no eval report" in text, text
    assert "FAILED: nothing deployed" in (reports[-1] / "report.md").read_text()
    after = registry.load(str(root), "bot")
    assert after.versions.keys() == before.versions.keys()  # not even registered
    assert (after.aliases, after.traffic) == (before.aliases, before.traffic)


@pytest.mark.ray
def test_retrain_refuses_a_model_without_champion(loop, capsys):
    from oikyo_ray.cli import main

    assert main(["retrain", "nobody", "--config", str(loop["config"])]) == 2
    assert "model 'nobody' has no version or alias 'champion'" in capsys.readouterr().err
