"""lm-evaluation-harness in `oikyo eval` (eval.lm_eval_tasks), with the real harness on tiny fine-tunes
trained in-process: base and tuned side by side in the report, per (model, task) results cached,
drop gates set the exit code, bad entries fail before a model loads, a local task YAML runs offline."""

import json
from pathlib import Path

import pytest

from oikyo_ray.config import load_config
from oikyo_ray.errors import ConfigError
from oikyo_ray.eval.cli import main
from tests.test_eval_run import make_eval_runs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
# the generic evaluation is cut to a minimum: these tests are about the lm-eval section
QUICK = ["eval.probes=false", "eval.forgetting=false", "eval.max_samples=4", "eval.num_samples=2"]


@pytest.fixture(scope="module")
def runs(one_torch_thread, tiny_model, cache_dir, tmp_path_factory):
    return make_eval_runs(tiny_model, cache_dir, tmp_path_factory.mktemp("harness-runs"))


@pytest.fixture(scope="module")
def lm_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lm-eval-cache")


def _report(run: Path) -> dict:
    return json.loads((run / "eval/report.json").read_text())


def test_shipped_task_base_and_tuned_side_by_side(runs, lm_cache, tiny_model, monkeypatch):
    import lm_eval

    run = runs["lora"]
    over = [*QUICK, "eval.lm_eval_tasks=[oikyo_demo_mc]", f"eval.lm_eval_cache_dir={lm_cache}"]
    assert main([str(run), *over, "eval.lm_eval_max_drop={oikyo_demo_mc: 0.0}"]) == 0
    rep = _report(run)
    lm = rep["lm_eval"]
    acc = lm["tasks"]["oikyo_demo_mc"]["metrics"]["acc"]
    assert lm["tasks"]["oikyo_demo_mc"]["n"] == 40 and lm["cached"] == {"base": [], "tuned": []}
    # the adapter learned the demo look-ups: four-way choice well above the base's chance level
    assert acc["tuned"] >= acc["base"] + 0.3 and acc["base"] <= 0.5, acc
    assert acc["delta"] == pytest.approx(acc["tuned"] - acc["base"]) and acc["higher_is_better"] is True
    assert 0 < acc["base_stderr"] < 0.2
    gate = next(g for g in rep["gates"] if g["name"] == "lm_eval:oikyo_demo_mc/acc_drop")
    assert gate["passed"] and gate["value"] == pytest.approx(-acc["delta"]) and rep["passed"]
    md = (run / "eval/report.md").read_text()
    row = f"| lm-eval oikyo_demo_mc: acc (n=40) | {acc['base']:.4f} | {acc['tuned']:.4f} | {acc['delta']:.4f} |"
    assert row + " pass (drop <= 0) |" in md, md
    assert "| loss |" in md and "lm-eval 0.4.13" in md  # in the same table as the other metrics

    # the base side is what lm-eval's own `hf` model reports for the base model dir (lm-eval reads
    # data_files from the working directory)
    from oikyo_ray.eval.harness import ASSETS

    monkeypatch.chdir(ASSETS)
    own = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_model), "device": "cpu", "dtype": "float32"},
        tasks=["oikyo_demo_mc"],
        task_manager=lm_eval.tasks.TaskManager(include_path=str(ASSETS), include_defaults=False),
        log_samples=False,
    )
    assert own["results"]["oikyo_demo_mc"]["acc,none"] == pytest.approx(acc["base"])


def test_results_are_cached_per_model_and_task(runs, lm_cache, monkeypatch):
    from oikyo_ray.eval import harness

    over = [*QUICK, "eval.lm_eval_tasks=[oikyo_demo_mc]", f"eval.lm_eval_cache_dir={lm_cache}"]
    if not list(lm_cache.glob("*.json")):  # run alone: fill the cache first
        assert main([str(runs["lora"]), *over]) == 0
    files = {p: p.read_text() for p in lm_cache.glob("*.json") if p.name != "file_hashes.json"}
    assert len(files) == 2  # base and lora-tuned
    base_acc = _report(runs["lora"])["lm_eval"]["tasks"]["oikyo_demo_mc"]["metrics"]["acc"]["base"]

    loaded = []
    real = harness._Models.lm
    monkeypatch.setattr(harness._Models, "lm", lambda self, which, bs: loaded.append(which) or real(self, which, bs))
    # the same base with another adapter: only the tuned side runs
    assert main([str(runs["fresh"]), *over]) == 0
    rep = _report(runs["fresh"])["lm_eval"]
    assert loaded == ["tuned"] and rep["cached"] == {"base": ["oikyo_demo_mc"], "tuned": []}
    acc = rep["tasks"]["oikyo_demo_mc"]["metrics"]["acc"]
    assert acc["base"] == base_acc and acc["tuned"] == pytest.approx(base_acc)  # a B = 0 adapter is the base
    assert all(p.read_text() == text for p, text in files.items())  # cache files reused, not rewritten

    # the report's base numbers come from the cache file: an edited file shows through
    base_file = next(p for p, t in files.items() if json.loads(t)["model"] == "base")
    doctored = json.loads(files[base_file])
    doctored["result"]["tasks"]["oikyo_demo_mc"]["acc"]["value"] = 0.123
    base_file.write_text(json.dumps(doctored))
    loaded.clear()
    assert main([str(runs["fresh"]), *over]) == 0
    assert (
        loaded == [] and _report(runs["fresh"])["lm_eval"]["tasks"]["oikyo_demo_mc"]["metrics"]["acc"]["base"] == 0.123
    )
    base_file.write_text(files[base_file])

    # another limit is another key: both models run again, on 10 documents
    assert main([str(runs["fresh"]), *over, "eval.lm_eval_limit=10"]) == 0
    rep = _report(runs["fresh"])["lm_eval"]
    assert loaded == ["base", "tuned"] and rep["cached"] == {"base": [], "tuned": []}
    assert rep["tasks"]["oikyo_demo_mc"]["n"] == 10 and rep["limit"] == 10
    # the tuned side ran on the same task objects after the base: still the base's numbers
    acc = rep["tasks"]["oikyo_demo_mc"]["metrics"]["acc"]
    assert acc["tuned"] == pytest.approx(acc["base"])


def test_drop_gates_set_the_exit_code(runs, lm_cache, capsys):
    run = runs["lora"]
    over = [*QUICK, "eval.lm_eval_tasks=[oikyo_demo_mc]", f"eval.lm_eval_cache_dir={lm_cache}"]
    # demanding a gain of 0.9 fails (the adapter gains less); the run's other gates pass
    assert main([str(run), *over, "eval.lm_eval_max_drop={oikyo_demo_mc/acc: -0.9}", "--fail-on-regression"]) == 3
    assert "regression gate(s) failed: lm_eval:oikyo_demo_mc/acc_drop" in capsys.readouterr().out
    rep = _report(run)
    assert rep["passed"] is False and [g["name"] for g in rep["gates"] if not g["passed"]] == [
        "lm_eval:oikyo_demo_mc/acc_drop"
    ]
    assert "FAIL (drop <= -0.9)" in (run / "eval/report.md").read_text()
    # a metric the task does not compute is a failed gate, listed in the table
    assert main([str(run), *over, "eval.lm_eval_max_drop={oikyo_demo_mc/acc_norm: 0.1}", "--fail-on-regression"]) == 3
    assert "| lm-eval oikyo_demo_mc/acc_norm (not computed) |" in (run / "eval/report.md").read_text()
    # a lower-is-better gate on the same numbers passes: the tuned model did not fall below the base
    assert main([str(run), *over, "eval.lm_eval_max_drop={oikyo_demo_mc: 0.0}", "--fail-on-regression"]) == 0


def test_bad_entries_name_the_field_before_a_model_loads(runs, tmp_path, capsys):
    from oikyo_ray.eval.compare import check_eval

    def err(*over: str) -> str:
        with pytest.raises(ConfigError) as e:
            check_eval(load_config(None, list(over)))
        return str(e.value)

    missing = tmp_path / "nope" / "task.yaml"
    assert f"eval.lm_eval_tasks: {missing} does not exist" in err(f"eval.lm_eval_tasks=[{missing}]")
    assert "holds no task YAML" in err(f"eval.lm_eval_tasks=[{tmp_path}]")
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    assert "not a readable task YAML" in err(f"eval.lm_eval_tasks=[{tmp_path / 'broken.yaml'}]")
    msg = err("eval.lm_eval_tasks=[oikyo_no_such_task]")
    assert "eval.lm_eval_tasks: 'oikyo_no_such_task' is neither a registered lm-eval task" in msg and "hint:" in msg
    msg = err("eval.lm_eval_tasks=[oikyo_demo_mc]", "eval.lm_eval_max_drop={hellaswag: 0.1}")
    assert "eval.lm_eval_max_drop: 'hellaswag' names task 'hellaswag'" in msg and "oikyo_demo_mc" in msg
    assert "eval.lm_eval_tasks is empty" in err("eval.lm_eval_max_drop={oikyo_demo_mc: 0.1}")
    from oikyo_ray.eval.harness import ASSETS

    shipped = ASSETS / "oikyo_demo_mc.yaml"
    assert "lists oikyo_demo_mc more than once" in err(f"eval.lm_eval_tasks=[oikyo_demo_mc, {shipped}]")
    # through the CLI: exit 2, and no report written (nothing was evaluated)
    run = runs["fresh"]
    (run / "eval" / "report.json").unlink(missing_ok=True)
    assert main([str(run), f"eval.lm_eval_tasks=[{missing}]"]) == 2
    assert "eval.lm_eval_tasks" in capsys.readouterr().err and not (run / "eval" / "report.json").exists()


def test_finetune_checks_the_tasks_before_anything_runs(tmp_path, cache_dir, monkeypatch):
    from oikyo_ray import finetune

    def too_late(*a, **k):
        raise AssertionError("the pipeline went on past a bad eval.lm_eval_tasks")

    monkeypatch.setattr(finetune, "resolve_model_path", too_late)
    monkeypatch.setattr(finetune, "init_ray", too_late)
    cfg = load_config(None, [f"model.cache_dir={cache_dir}", f"eval.lm_eval_tasks=[{tmp_path / 'none.yaml'}]"])
    with pytest.raises(ConfigError, match="eval.lm_eval_tasks: .*none.yaml does not exist"):
        finetune.run_finetune(cfg, log=lambda s: None)


def test_local_task_yaml_runs_offline_from_another_folder(runs, tiny_model, tmp_path, monkeypatch):
    """A folder of task YAMLs: a generate_until task whose data_files are relative to its YAML and
    whose settings come through `include:`, evaluated from an unrelated working directory."""
    from oikyo_ray.eval.harness import evaluate_tasks

    tasks = tmp_path / "my-tasks"
    (tasks / "data").mkdir(parents=True)
    im = "<|im_start|>"
    docs = [("Capital of Peru?", "Lima"), ("What is the capital of Japan?", "Tokyo"), ("Opposite of hot?", "cold")]
    (tasks / "data" / "qa.jsonl").write_text(
        "".join(json.dumps({"q": f"{im}user\n{q}<|im_end|>\n{im}assistant\n", "a": a}) + "\n" for q, a in docs)
    )
    (tasks / "_gen.yaml").write_text(  # no task: key: a shared template, not a task of its own
        "output_type: generate_until\ntest_split: test\n"
        "generation_kwargs:\n  until: ['<|im_end|>']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (tasks / "qa.yaml").write_text(
        "include: _gen.yaml\ntask: my_qa\ndataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: data/qa.jsonl\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(
        Path(runs["lora"]) / "config.yaml",
        [f"eval.lm_eval_tasks=[{tasks}]", f"eval.lm_eval_cache_dir={tmp_path / 'cache'}"],
    )
    got = evaluate_tasks(cfg, str(tiny_model), str(runs["lora"] / "adapter"), log=lambda s: None)
    em = got["tasks"]["my_qa"]["metrics"]["exact_match"]
    assert got["tasks"]["my_qa"]["n"] == 3 and got["tasks"]["my_qa"]["entry"] == str(tasks)
    assert em["base"] == 0.0 and em["tuned"] >= 2 / 3, em  # the tuned model answers the demo look-ups
    assert len(list((tmp_path / "cache").glob("*.json"))) == 3  # base, tuned and the file-hash memo


def test_full_fine_tune_dir_is_the_tuned_model(runs, tiny_model, tmp_path, monkeypatch):
    """A model/ dir (method.type=full) is evaluated as itself: the tuned side is what lm-eval's own
    `hf` model reports for that dir."""
    import lm_eval

    from oikyo_ray.eval.harness import ASSETS, evaluate_tasks

    run = runs["full"]
    cfg = load_config(run / "config.yaml", ["eval.lm_eval_tasks=[oikyo_demo_mc]", f"eval.lm_eval_cache_dir={tmp_path}"])
    acc = evaluate_tasks(cfg, str(tiny_model), str(run / "model"), log=lambda s: None)["tasks"]["oikyo_demo_mc"]
    acc = acc["metrics"]["acc"]
    monkeypatch.chdir(ASSETS)  # lm-eval reads data_files from the working directory
    own = lm_eval.simple_evaluate(
        model="hf",
        model_args={
            "pretrained": str(run / "model"),
            "tokenizer": str(tiny_model),
            "device": "cpu",
            "dtype": "float32",
        },
        tasks=["oikyo_demo_mc"],
        task_manager=lm_eval.tasks.TaskManager(include_path=str(ASSETS), include_defaults=False),
        log_samples=False,
    )
    assert own["results"]["oikyo_demo_mc"]["acc,none"] == pytest.approx(acc["tuned"])
    assert acc["tuned"] >= acc["base"] + 0.2, acc  # it learned the look-ups: not the base evaluated twice


def test_shipped_task_data_is_what_the_builder_writes():
    from oikyo_ray.demo.tasks import MC_ASSET, build_mc_docs

    docs = [json.loads(line) for line in MC_ASSET.read_text().splitlines()]
    assert docs == build_mc_docs()  # rebuilt by `python -m oikyo_ray.demo.tasks`
    assert len(docs) == 40 and all(len(set(d["choices"])) == 4 and 0 <= d["answer"] < 4 for d in docs)
