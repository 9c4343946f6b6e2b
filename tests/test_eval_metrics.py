"""Evaluation building blocks on known inputs: metrics, probe scoring, gates, config, runs compare."""

import json
import math

import pytest

from oikyo_ray.config import EvalConfig, load_config
from oikyo_ray.errors import ConfigError, DataError, OikyoError
from oikyo_ray.eval import metrics as M
from oikyo_ray.eval.gates import evaluate_gates
from oikyo_ray.eval.probes import ProbeScorer, load_probes, probe_rates


def test_rouge_l_hand_computed():
    # LCS("a c d e", "a b c d") = "a c d" (3): P = R = 3/4
    assert M.rouge_l("a c d e", "a b c d") == pytest.approx(0.75)
    # pred "the cat sat" vs ref "the cat sat on the mat": LCS 3, P = 1, R = 1/2 -> F = 2/3
    assert M.rouge_l("The cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert M.rouge_l("x y", "a b") == 0.0


def test_bleu_hand_computed():
    # n-gram precisions 4/5, 3/4, 2/3, 1/2, equal lengths (BP = 1): (0.2) ** (1/4)
    assert M.corpus_bleu(["a b c d e"], ["a b c d f"]) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # exact match but shorter than the reference: precisions 1, brevity penalty exp(1 - 6/4)
    assert M.corpus_bleu(["a b c d"], ["a b c d e f"]) == pytest.approx(math.exp(1 - 6 / 4))
    assert M.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert math.isnan(M.corpus_bleu([], []))


def test_exact_match_and_f1_still_squad_style():
    assert M.exact_match("Lima.", "lima") == 1.0 and M.exact_match("Lim", "Lima") == 0.0
    assert M.token_f1("a b c", "a b d") == pytest.approx(2 / 3)


def test_json_validity():
    assert M.json_valid(' {"a": 1} ') == 1.0 and M.json_valid("[1, 2]") == 1.0
    assert M.json_valid('"just a string"') == 0.0 and M.json_valid("{bad") == 0.0 and M.json_valid("") == 0.0


def test_tool_call_accuracy():
    ref = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'
    same_args_as_string = json.dumps({"name": "get_weather", "arguments": json.dumps({"unit": "C", "city": "Paris"})})
    wrong_city = '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}'
    openai_style = json.dumps(
        {
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "C"})},
        }
    )
    assert M.tool_call_match(same_args_as_string, ref) == 1.0
    assert M.tool_call_match(openai_style, ref) == 1.0
    assert M.tool_call_match(wrong_city, ref) == 0.0 and M.tool_name_match(wrong_city, ref) == 1.0
    assert M.tool_call_match("get_weather(Paris)", ref) == 0.0 and M.tool_name_match("{}", ref) == 0.0
    two = '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]'
    assert M.tool_call_match(two, two) == 1.0
    assert M.tool_call_match('[{"name": "b", "arguments": {"x": 1}}, {"name": "a", "arguments": {}}]', two) == 0.0


def test_score_applies_each_metric_to_its_rows():
    refs = ['{"name": "f", "arguments": {"x": 1}}', '{"k": "v"}', "Paris"]
    tools = [True, False, False]
    preds = ['{"name": "f", "arguments": {"x": 2}}', '{"k": "v"}', "paris"]
    names = M.choose_metrics("auto", refs, tools)
    assert names == ["exact_match", "token_f1", "rouge_l", "bleu", "tool_call", "tool_name", "json_valid"]
    s = M.score(names, preds, refs, tools)
    assert s["tool_call"] == {"value": 0.0, "n": 1} and s["tool_name"] == {"value": 1.0, "n": 1}
    assert s["json_valid"] == {"value": 1.0, "n": 2}  # the tool row and the JSON row
    assert s["exact_match"] == {"value": pytest.approx(2 / 3), "n": 3}
    assert M.choose_metrics("auto", ["Paris"], [False]) == ["exact_match", "token_f1", "rouge_l", "bleu"]
    assert M.choose_metrics(["bleu"], refs, tools) == ["bleu"]
    assert math.isnan(M.score(["tool_call"], ["x"], ["Paris"], [False])["tool_call"]["value"])


def test_probe_scoring():
    s = ProbeScorer()
    assert s.refuses("I\u2019m sorry, but I can\u2019t help with that.") and s.refuses("I CANNOT do this")
    assert not s.refuses("Sure! Step one: take the lock.")
    assert s.toxic("you are an idiot") and s.toxic("I will KILL it") and not s.toxic("an idiotic plan")
    assert s.degenerate("") and s.degenerate("the the the the cat") and not s.degenerate("the cat sat down")
    assert s.degenerate("blancancancancanc") and s.degenerate("{{{{{") and not s.degenerate("ancancancanc")
    assert s.passes("refuse", "I can't help") and not s.passes("refuse", "ok")
    assert s.passes("toxic", "a kind reply") and not s.passes("toxic", "shut up, loser")
    assert s.passes("ood", "I do not understand the question") and not s.passes("ood", "   ")
    probes = [{"kind": "refuse"}, {"kind": "refuse"}, {"kind": "toxic"}, {"kind": "ood"}]
    rates = probe_rates(probes, ["I won't", "here you go", "idiot", "fine answer"], s)
    assert rates == {"refuse": {"rate": 0.5, "n": 2}, "toxic": {"rate": 0.0, "n": 1}, "ood": {"rate": 1.0, "n": 1}}


def test_shipped_probes_and_replaceable_files(tmp_path):
    shipped = load_probes()
    assert {p["kind"] for p in shipped} == {"refuse", "toxic", "ood"} and len(shipped) >= 18
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": "a", "kind": "refuse", "prompt": "x"}\n{"id": "b", "kind": "nice", "prompt": "y"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: a probe needs kind"):
        load_probes(bad)
    phrases, lex = tmp_path / "ref.txt", tmp_path / "lex.txt"
    phrases.write_text("# comment\nnope\n")
    lex.write_text("banana\n")
    s = ProbeScorer(phrases, lex)
    assert s.refuses("Nope.") and not s.refuses("I can't")
    assert s.toxic("a Banana") and not s.toxic("idiot")


def _report(**over):
    r = {
        "base": {"loss": 2.0, "perplexity": 7.39, "exact_match": 0.1},
        "tuned": {"loss": 1.0, "perplexity": 2.72, "exact_match": 0.3},
        "forgetting": {"relative_increase": 0.1, "flagged": False},
        "probes": {
            "kinds": {
                "refuse": {"base": 0.5, "tuned": 0.25, "regressed": True},
                "toxic": {"base": 1.0, "tuned": 1.0, "regressed": False},
            }
        },
    }
    r.update(over)
    return r


def test_gates_pass_and_fail():
    ec = EvalConfig(
        min_improvement={"loss": 0.5, "exact_match": 0.25},
        min_tuned={"perplexity": 3.0, "exact_match": 0.3, "tool_call": 0.5},
    )
    g = {x["name"]: x for x in evaluate_gates(_report(), ec)}
    assert g["improvement:loss"]["passed"] and g["improvement:loss"]["value"] == pytest.approx(1.0)
    assert not g["improvement:exact_match"]["passed"]  # 0.2 < 0.25
    assert g["tuned:perplexity"]["passed"] and g["tuned:perplexity"]["op"] == "<="  # lower is better
    assert g["tuned:exact_match"]["passed"]
    assert not g["tuned:tool_call"]["passed"]  # configured but not computed: not a pass
    assert g["forgetting:general_perplexity_rise"]["passed"]
    assert not g["probes:refuse_pass_rate_drop"]["passed"] and g["probes:toxic_pass_rate_drop"]["passed"]
    flagged = _report(forgetting={"relative_increase": 2.0, "flagged": True})
    assert not {x["name"]: x for x in evaluate_gates(flagged, EvalConfig())}["forgetting:general_perplexity_rise"][
        "passed"
    ]
    # defaults: only the loss gate, forgetting and probe gates
    assert [x["name"] for x in evaluate_gates(_report(), EvalConfig())] == [
        "improvement:loss",
        "forgetting:general_perplexity_rise",
        "probes:refuse_pass_rate_drop",
        "probes:toxic_pass_rate_drop",
    ]


def test_eval_config_fields_are_described_and_strict():
    assert all(f.description for f in EvalConfig.model_fields.values())
    with pytest.raises(ConfigError, match="eval.max_forgeting"):
        load_config(None, ["eval.max_forgeting=0.1"])
    with pytest.raises(ConfigError, match="eval.metrics"):
        load_config(None, ["eval.metrics=[blue]"])
    with pytest.raises(ConfigError, match="eval.min_improvement"):
        load_config(None, ["eval.min_improvement={accuracy: 0.1}"])
    cfg = load_config(None, ["eval.metrics=[rouge_l,tool_call]", "eval.backend=ray"])
    assert cfg.eval.metrics == ["rouge_l", "tool_call"] and cfg.eval.backend == "ray"


def _write_run(root, name, base, tuned, passed=True, forgetting=0.05, lm_eval=None):
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "report.json").write_text(
        json.dumps(
            {
                "metrics": ["exact_match"],
                "base": {"loss": 3.0, "perplexity": 20.0, "exact_match": base, "n": 5},
                "tuned": {"loss": 1.0, "perplexity": "inf", "exact_match": tuned, "n": 5},
                "forgetting": {"relative_increase": forgetting},
                "probes": {"kinds": {"refuse": {"tuned": 0.5, "delta": -0.25}}},
                "passed": passed,
                **({"lm_eval": lm_eval} if lm_eval else {}),
            }
        )
    )
    return run


def test_runs_compare_side_by_side(tmp_path, capsys):
    from oikyo_ray.cli import main
    from oikyo_ray.runs.compare import compare_runs, format_comparison

    a = _write_run(tmp_path, "run-a", 0.1, 0.5)
    lm = {"tasks": {"oikyo_demo_mc": {"metrics": {"acc": {"tuned": 0.8, "delta": 0.55}}}}}
    b = _write_run(tmp_path, "run-b", 0.2, 0.3, passed=False, forgetting=0.6, lm_eval=lm)
    text = format_comparison(compare_runs([a, b]))
    lines = text.splitlines()
    assert lines[0] == "| metric | run-a | run-b |"
    assert "| exact_match | 0.5000 (+0.4000) | 0.3000 (+0.1000) |" in lines
    assert "| perplexity | inf | inf |" in lines
    assert "| general-text perplexity rise | 0.0500 | 0.6000 |" in lines
    assert "| probe pass rate: refuse | 0.5000 (-0.2500) | 0.5000 (-0.2500) |" in lines
    assert "| lm-eval oikyo_demo_mc: acc | – | 0.8000 (+0.5500) |" in lines  # run-a ran no lm-eval task
    assert "| gates | passed | FAILED |" in lines
    out = tmp_path / "cmp.md"
    capsys.readouterr()
    assert main(["runs", "compare", str(a), str(b), "--out", str(out)]) == 0  # what users run
    assert out.read_text() == text + "\n" and capsys.readouterr().out == text + "\n"
    assert main(["runs", "compare", str(a), str(tmp_path / "missing")]) == 2
    assert "no evaluation report" in capsys.readouterr().err
    with pytest.raises(OikyoError, match="no evaluation report"):
        compare_runs([a, tmp_path / "missing"])


def test_answers_are_scored_without_their_reasoning_trace():
    """A tuned model that thinks before it answers is scored on the answer: with its trace it
    would never match the reference exactly."""
    from oikyo_ray.eval.compare import summarise
    from oikyo_ray.eval.items import Item, ItemKind
    from oikyo_ray.eval.scoring import ItemScore

    cfg = load_config(None, ["eval.metrics=[exact_match]"])
    items = [Item(f"t{i}", ItemKind.TASK, prompt="q", reference=ref) for i, ref in enumerate(["Five.", "Lima"])]
    texts = [
        {"base": "Four.", "tuned": "<think>\ntwo and three make five\n</think>\n\nFive."},
        {"base": "Lima", "tuned": "<think>\ncapital of Peru\n</think>\n\nLima"},
    ]
    scores = [ItemScore(it.id, 0, {"base": 0.0, "tuned": 0.0}, t) for it, t in zip(items, texts)]
    report = summarise(cfg, items, scores)
    assert (report["base"]["exact_match"], report["tuned"]["exact_match"]) == (0.5, 1.0)
