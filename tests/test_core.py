"""The Ray-free core: the import contract holds and covers every module; the core imports and
runs without Ray (tokenise/mask, train loop, eval metrics, generation)."""

import ast
import fnmatch
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch

from oikyo_ray.config import load_config
from oikyo_ray.data.tokenize import IGNORE, encode_messages
from oikyo_ray.eval.metrics import exact_match, normalise_answer, token_f1

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "oikyo_ray"

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONTRACT = PYPROJECT["tool"]["importlinter"]["contracts"][0]  # the Ray-free core contract


def _modules() -> list[str]:
    """Every module of the package by dotted name (a package by its own name)."""
    out = []
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(out)


def _ray_layer() -> set[str]:
    """The modules the contract forbids to the core (its `forbidden_modules`, wildcards expanded)."""
    layer = set()
    for pattern in CONTRACT["forbidden_modules"]:
        if pattern.startswith("oikyo_ray"):
            layer |= {m for m in _modules() if fnmatch.fnmatchcase(m, pattern) and m.count(".") == pattern.count(".")}
    return layer


def _imports_ray(module: str) -> bool:
    path = PKG.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and not node.level
            else []
        )
        if any(n == "ray" or n.startswith("ray.") for n in names):
            return True
    return False


def test_import_contract_holds():
    """`lint-imports` (import-linter, config in pyproject.toml): the core imports neither ray nor
    the Ray layer, directly or through another module, and no package imports in a cycle."""
    r = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout, r.stdout[-2000:]


def test_every_module_is_core_or_named_ray_layer():
    """A module that imports ray is in the contract's Ray layer, and each Ray adapter is named
    ray_<x>.py: a new module is core unless it says otherwise, and the contract cannot miss it."""
    layer = _ray_layer()
    deep = [m for m in _modules() if m.count(".") > 2]
    assert not deep, f"{deep}: the contract's source_modules reach oikyo_ray.<pkg>.<module> only"
    assert {m for m in _modules() if _imports_ray(m)} <= layer, sorted(
        {m for m in _modules() if _imports_ray(m)} - layer
    )
    adapters = {m for m in _modules() if m.rsplit(".", 1)[-1].startswith("ray_")}
    stages = [m.split(".")[1] for m in adapters]
    assert adapters <= layer and len(stages) == len(set(stages)), (sorted(adapters), sorted(layer))
    # one adapter per stage
    assert set(stages) == {"data", "train", "eval", "sweep", "cv", "methods", "serve", "deploy", "drift", "retrain"}


def test_core_imports_without_ray():
    """A GPU box without Ray runs the core: with `import ray` failing, every core module imports."""
    core = [m for m in _modules() if m not in _ray_layer()]
    assert len(core) > 30, core
    code = (
        "import sys; sys.modules['ray'] = None\n"
        f"import importlib\nfor m in {core!r}: importlib.import_module(m)\nprint('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_prompt_masking_learns_only_assistant_tokens(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima"},
    ]
    enc = encode_messages(tok, msgs, max_length=64)
    learned = [i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE]
    assert tok.decode(learned).startswith("Lima<|im_end|>")
    assert tok.decode(enc["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)
    everything = encode_messages(tok, msgs, max_length=64, train_on_prompt=True)
    assert everything["labels"] == everything["input_ids"]
    with pytest.raises(ValueError, match="max_length"):
        encode_messages(tok, msgs, max_length=8)  # the answer is truncated away


def test_masked_prompt_is_tokenised_as_at_inference(tiny_model):
    """The tokens before each answer are those of the prompt rendered and tokenised whole, as
    `generate` sees it (not per-message pieces glued together); answers are learned, in order."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima"},
        {"role": "user", "content": "And of Chile?"},
        {"role": "assistant", "content": "Santiago"},
    ]
    enc = encode_messages(tok, msgs, max_length=256)
    for i in (2, 4):  # each assistant turn
        prompt = tok(
            tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True), add_special_tokens=False
        )["input_ids"]
        after = tok(tok.apply_chat_template(msgs[: i + 1], tokenize=False), add_special_tokens=False)["input_ids"]
        assert enc["input_ids"][: len(prompt)] == prompt
        assert enc["labels"][len(prompt) - 1] == IGNORE and enc["labels"][len(prompt)] != IGNORE
        if i == 4:
            assert enc["input_ids"] == after
    learned = tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE])
    assert learned == "Lima<|im_end|>\nSantiago<|im_end|>\n"


def test_default_template_renders_tools_and_calls(tiny_model):
    """A tokenizer without a template gets the default; it shows the row's tools to the model,
    wraps calls in <tool_call>, and masking still learns only the assistant turns (the call too)."""
    from transformers import AutoTokenizer

    from oikyo_ray.model.chat_template import DEFAULT_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    tools = [{"name": "get_weather", "description": "Weather now", "parameters": {"type": "object"}}]
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Lima"}})
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Lima?"},
        {"role": "assistant", "content": call, "tool_call": True},
        {"role": "tool", "content": '{"temp": 19}'},
        {"role": "assistant", "content": "19 degrees."},
    ]
    text = tok.apply_chat_template(msgs, tools=tools, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert f"<tools>\n{json.dumps(tools[0])}\n</tools>" in text and text.count("<|im_start|>system") == 1
    assert f"<|im_start|>assistant\n<tool_call>\n{call}\n</tool_call><|im_end|>" in text
    enc = encode_messages(tok, msgs, max_length=512, tools=tools)
    assert tok.decode(enc["input_ids"]) == text
    learned = tok.decode([i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE])
    assert learned == f"<tool_call>\n{call}\n</tool_call><|im_end|>\n19 degrees.<|im_end|>\n"
    plain = tok.apply_chat_template(msgs[1:2], tokenize=False)  # no tools: ChatML as before
    assert plain == "<|im_start|>user\nWeather in Lima?<|im_end|>\n"


def test_metrics_on_known_inputs():
    assert normalise_answer("  The  Lima! ") == "the lima"
    assert exact_match("Lima.", "lima") == 1.0 and exact_match("Lim", "Lima") == 0.0
    # pred "a b c", ref "a b d": precision 2/3, recall 2/3 -> F1 2/3
    assert token_f1("a b c", "a b d") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("x", "y") == 0.0


def test_train_loop_reduces_loss_without_ray(tiny_model, cache_dir):
    from oikyo_ray.data.curate import curate_file
    from oikyo_ray.demo.tasks import ASSET
    from oikyo_ray.eval.compare import evaluate_model
    from oikyo_ray.model.load import load_model, load_tokenizer
    from oikyo_ray.model.methods import apply_method, trainable_parameters
    from oikyo_ray.train.loop import LoopHooks, collate, shuffled_batches, train_loop

    cfg = load_config(
        None,
        [
            f"model.cache_dir={cache_dir}",
            "train.lr=3e-3",
            "train.log_every=5",
            "train.eval_every=30",
            "train.checkpoint_every=30",
        ],
    )
    tok = load_tokenizer(cfg.model, str(tiny_model))
    recs = [r for r in curate_file(str(ASSET), ASSET.read_bytes(), cfg.data, tok) if r["status"] == "ok"]
    torch.manual_seed(0)
    model = apply_method(load_model(cfg.model, str(tiny_model)), cfg.method)
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < total  # LoRA: base frozen
    batches = lambda e: (collate(b, tok.pad_token_id) for b in shuffled_batches(recs, 16, e))  # noqa: E731
    val = [
        collate(
            {"input_ids": [r["input_ids"] for r in recs[:32]], "labels": [r["labels"] for r in recs[:32]]},
            tok.pad_token_id,
        )
    ]
    reports = []
    hooks = LoopHooks(report=lambda m, ckpt: reports.append((dict(m), ckpt)), val_batches=lambda: val)
    train_loop(model, batches, cfg.train, 60, hooks)
    losses = [m["loss"] for m, _ in reports]
    vals = [m["val_loss"] for m, _ in reports if "val_loss" in m]
    assert losses[-1] < losses[0] - 1.0, losses
    assert len(vals) == 2 and vals[-1] < vals[0]
    assert [m["step"] for m, c in reports if c] == [30, 60]  # checkpoint_every + the final step
    metrics, preds = evaluate_model(model, tok, recs[:8], cfg)
    assert metrics["n"] == 8 and len(preds) == 8 and metrics["loss"] < 6


def test_lr_schedule_warmup_and_decay():
    from oikyo_ray.train.loop import build_scheduler

    cfg = load_config(None, ["train.warmup_ratio=0.1", "train.lr=1.0"]).train
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, 100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[9] <= 1.0 and lrs[10] == pytest.approx(1.0, abs=0.02) and lrs[-1] < 0.01


def test_collate_pads_right_and_masks():
    from oikyo_ray.train.loop import collate

    b = collate({"input_ids": [[5, 6, 7], [8]], "labels": [[IGNORE, 6, 7], [8]]}, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_run_dir_holds_no_secrets(tmp_path, monkeypatch):
    from oikyo_ray.runs.rundir import create_run_dir, write_lineage

    monkeypatch.setenv("OIKYO_API_TOKEN", "sekret-token-123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekret-aws-456")
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=r1"])
    run = create_run_dir(cfg)
    write_lineage(run, cfg, {"content_hash": "h", "counts": {}}, "/m")
    text = "".join(p.read_text() for p in run.rglob("*") if p.is_file())
    assert "sekret" not in text
    assert json.loads((run / "lineage.json").read_text())["seed"] == cfg.train.seed
    with pytest.raises(Exception, match="already exists"):
        create_run_dir(cfg)
