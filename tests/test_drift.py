"""Drift: the statistics against known values, the checks on shifted and unshifted prompts, the
report's gauges, and `oikyo drift` end to end on a real local Ray (Ray Data reads the capture)
against a registry model's run: shifted traffic drifts (exit 3 with --fail-on-drift, report files
beside the capture), traffic like the training prompts does not."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oikyo_ray.config import load_config
from oikyo_ray.drift import stats
from oikyo_ray.drift.check import checks, drift_report, feedback_trend, prompt_text, summarize
from oikyo_ray.model.load import load_tokenizer
from oikyo_ray.serve.capture import ParquetWriter
from oikyo_ray.serve.drift_view import drift_values

CITIES = ["Peru", "Chile", "Spain", "Kenya", "Japan", "Norway", "Egypt", "Canada", "India", "Brazil"]
ASKS = ["What is the capital of {}?", "Name the largest city of {}.", "Which language is spoken in {}?"]
# long prompts in another script: what a shift in the traffic looks like
SHIFTED = "Пожалуйста, подробно объясните, как работает система налогообложения в стране {} и почему. "


def shifted(n: int) -> list[str]:
    return [SHIFTED.format(c) * 4 for c in (CITIES * n)[:n]]


def english(n: int, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    return [rnd.choice(ASKS).format(rnd.choice(CITIES)) for _ in range(n)]


def test_statistics_against_known_values():
    same = np.arange(100)
    assert stats.psi(same, same) == pytest.approx(0) and stats.ks(same, same) == 0
    assert stats.ks(np.zeros(10), np.ones(10)) == 1.0
    assert stats.psi(same, same + 1000) > 5  # everything in the last bin: a major shift
    assert stats.js(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)  # disjoint: 1 bit
    assert stats.js(np.array([1, 3]), np.array([2, 6])) == pytest.approx(0.0)
    assert stats.script_mix(["abc", "где"]) == {"LATIN": 0.5, "CYRILLIC": 0.5}
    assert stats.script_mix(["12 + 3 = 15!"]) == {}  # digits and signs belong to no script
    assert stats.total_variation({"LATIN": 1.0}, {"LATIN": 0.5, "CYRILLIC": 0.5}) == pytest.approx(0.5)


def test_prompt_text_is_what_the_user_wrote():
    chat = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"text": "Hi"}]}])
    assert prompt_text({"endpoint": "chat", "prompt": chat}) == "Be brief.\nHi"
    assert (
        prompt_text({"endpoint": "chat", "prompt": '[{"role": "user", "content": "cut'})
        == '[{"role": "user", "content": "cut'
    )
    assert prompt_text({"endpoint": "completions", "prompt": "Q: 2+2?"}) == "Q: 2+2?"


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(load_config(None).model, str(tiny_model))


def test_shifted_prompts_drift_and_alike_prompts_do_not(tok):
    cfg = load_config(None, ["drift.min_live_rows=20"]).drift
    ref = summarize(english(300, seed=1), tok)
    alike = drift_report("bot", ref, summarize(english(200, seed=2), tok), cfg)
    assert alike["drifted"] is False, alike["checks"]
    moved = drift_report("bot", ref, summarize(shifted(50), tok), cfg)
    assert moved["drifted"] is True
    drifted = {c["check"] for c in moved["checks"] if c["drifted"]}
    assert {"length_psi", "length_ks", "unigram_js", "script_tv"} <= drifted, moved["checks"]
    few = drift_report("bot", ref, summarize(english(5), tok), cfg)
    assert few["drifted"] is None and few["enough_rows"] is False  # figures, but no verdict
    ppl = checks(ref, ref, cfg, {"live": 30.0, "test": 10.0})
    assert [c["drifted"] for c in ppl if c["check"] == "perplexity_ratio"] == [True]
    assert (ref + ref).n == 600 and int((ref + ref).unigrams.sum()) == 2 * int(ref.unigrams.sum())


def test_feedback_trend_per_version_and_day():
    rows = [
        {"version": "1", "date": "2026-12-01", "verdict": "positive"},
        {"version": "1", "date": "2026-12-01", "verdict": "negative"},
        {"version": "1", "date": "2026-12-02", "verdict": "neutral"},
        {"version": "2", "date": "2026-12-02", "verdict": "positive"},
    ]
    trend = feedback_trend(rows)
    assert trend["1"] == [
        {"date": "2026-12-01", "positive": 1, "negative": 1, "share": 0.5},
        {"date": "2026-12-02", "positive": 0, "negative": 0, "share": None},
    ]
    assert trend["2"][0]["share"] == 1.0


def test_reports_become_gauge_values_and_bad_ones_are_skipped(tmp_path):
    base = tmp_path / "drift"
    for name, drifted in (("bot", True), ("calm", False), ("new", None)):
        (base / name).mkdir(parents=True)
        checks_ = [{"check": "length_psi", "value": 0.5, "threshold": 0.25, "drifted": True}]
        (base / name / "report.json").write_text(json.dumps({"drifted": drifted, "checks": checks_}))
    (base / "broken").mkdir()
    (base / "broken" / "report.json").write_text("{not json")
    values = drift_values(str(tmp_path))
    assert values["bot"] == {"detected": 1.0, "length_psi": 2.0}
    assert values["calm"]["detected"] == 0.0 and values["new"]["detected"] == -1.0 and "broken" not in values
    assert drift_values(str(tmp_path / "nothing-here")) == {}


# ------------------------------------------------------------------------- oikyo drift on Ray
def _split(dirpath: Path, texts: list[str]) -> None:
    dirpath.mkdir(parents=True)
    rows = [
        {
            "hash": f"{i:08d}",
            "messages": json.dumps([{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}]),
        }
        for i, t in enumerate(texts)
    ]
    pq.write_table(pa.Table.from_pylist(rows), dirpath / "part-0.parquet")


@pytest.fixture(scope="module")
def registry_run(ray_session, tiny_model, cache_dir, tmp_path_factory):
    """A registry model `bot` whose champion's run was trained on English questions."""
    from oikyo_ray.registry import registry
    from tests.test_deploy import _write_run

    root = tmp_path_factory.mktemp("drift-root")
    cfg = load_config(None, [f"model.cache_dir={cache_dir}", f"run.root={root}"])
    run = root / "run-1"
    _write_run(cfg, str(tiny_model), run, seed=0)
    _split(run / "data" / "train", english(200, seed=3))
    _split(run / "data" / "test", english(40, seed=4))
    for model in ("bot", "calm"):
        registry.register(str(root), model, str(run))
        registry.set_alias(str(root), model, "champion", 1)
    return cfg, root


def _capture(root: Path, served: str, texts: list[str]) -> None:
    w = ParquetWriter(str(root / "capture" / "completions"), None, flush_rows=80)
    for i, t in enumerate(texts):
        w.offer(
            {
                "id": f"cmpl-{served}{i}",
                "created": time.time(),
                "model": served,
                "endpoint": "completions",
                "prompt": t,
            }
        )
    w.close()


@pytest.mark.slow
@pytest.mark.ray
def test_oikyo_drift_flags_shifted_traffic_end_to_end(registry_run, capsys):
    from oikyo_ray.cli import main

    cfg, root = registry_run
    _capture(root, "bot-v1", shifted(200))
    _capture(root, "calm-v1", english(200, seed=5))
    args = [f"model.cache_dir={cfg.model.cache_dir}", f"run.root={root}"]
    assert main(["drift", "bot", "--fail-on-drift", *args]) == 3
    out = capsys.readouterr().out
    assert "bot v1: DRIFTED (" in out and "script_tv" in out, out
    report = json.loads((root / "capture" / "drift" / "bot" / "report.json").read_text())
    assert report["rows"] == {"reference": 200, "live": 200} and report["version"] == 1
    # the adapter is random here: the ratio is only required to be scored, not to drift
    assert report["perplexity"]["live"] > 0 and report["perplexity"]["test"] > 0
    assert "perplexity_ratio" in {c["check"] for c in report["checks"]}
    assert (root / "capture" / "drift" / "bot" / "lengths.png").stat().st_size > 1000
    assert "DRIFTED" in (root / "capture" / "drift" / "bot" / "report.md").read_text()

    assert main(["drift", "calm", "--fail-on-drift", *args]) == 0
    calm = json.loads((root / "capture" / "drift" / "calm" / "report.json").read_text())
    assert calm["drifted"] is False and calm["rows"]["live"] == 200, calm["checks"]
    assert drift_values(str(root / "capture"))["bot"]["detected"] == 1.0


def test_drift_of_an_unknown_model_names_it(tmp_path, capsys):
    from oikyo_ray.cli import main

    assert main(["drift", "nobody", f"run.root={tmp_path}", "drift.psi_max=-1"]) == 2
    assert "drift.psi_max" in capsys.readouterr().err  # bad config: before Ray, naming the field
    assert main(["drift", "nobody", f"run.root={tmp_path}"]) != 0
    assert "'nobody' has no version or alias 'champion'" in capsys.readouterr().err  # before Ray too
