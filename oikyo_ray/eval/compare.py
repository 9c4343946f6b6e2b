"""Base vs fine-tuned on the same items and decoding (Ray-free core of the evaluate stage).

    compare(cfg, model_path, tuned_dir, rows) -> report dict

Three kinds of *items* are scored by both models, one batch at a time, by `score_batch`:

    task     a held-out test row: next-token loss on its labelled (answer) tokens, and a
             generation from its prompt (all turns but the last, tools passed to the template)
    general  a chunk of the general-text slice: loss on every token (forgetting)
    probe    a safety/robustness prompt: a generation only (see `probes`)

`score_batch` is what each Ray Data actor runs too (`eval.distributed`), so the in-process and the
distributed paths compute the same numbers; `summarise` turns per-item outputs into the report.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from oikyo_ray.config import OikyoConfig
from oikyo_ray.data.tokenize import IGNORE
from oikyo_ray.eval.generate import generate
from oikyo_ray.eval.metrics import choose_metrics, score
from oikyo_ray.model.prompt import render_prompt
from oikyo_ray.eval.probes import ASSETS, ProbeScorer, load_probes, probe_rates

MODELS = ("base", "tuned")


# ---- models -----------------------------------------------------------------------------------

def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


class ModelPair:
    """Base and fine-tuned, loaded once. An adapter dir is put on the base (one set of base
    weights; `use("base")` disables the adapter); a full or merged model dir is loaded beside it."""

    def __init__(self, cfg: OikyoConfig, model_path: str, tuned_dir: str | Path, device: str | None = None):
        from oikyo_ray.model.load import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(cfg.model, model_path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        base = load_model(cfg.model, model_path)
        self.adapter = is_adapter_dir(tuned_dir)
        if self.adapter:
            from peft import PeftModel

            self.base, self.tuned = None, PeftModel.from_pretrained(base, str(tuned_dir)).to(device).eval()
        else:
            self.base = base.to(device).eval()
            self.tuned = load_model(cfg.model, str(tuned_dir)).to(device).eval()

    @contextmanager
    def use(self, which: str):
        if which == "tuned":
            yield self.tuned
        elif self.adapter:
            with self.tuned.disable_adapter():
                yield self.tuned
        else:
            yield self.base


class SingleModel:
    """One model under the name "tuned" (for `evaluate_model`)."""

    def __init__(self, model, tokenizer):
        self.tokenizer, self.model = tokenizer, model

    def use(self, which: str):
        return nullcontext(self.model)


# ---- items --------------------------------------------------------------------------------------

def _item(id_: str, kind: str, prompt: str = "", input_ids=(), labels=(), reference: str = "",
          tool_call: bool = False, max_new_tokens: int = 0, probe_kind: str = "", user: str = "") -> dict:
    # every item has every field, with one type per field: a Ray Dataset needs one schema
    return {"id": id_, "kind": kind, "prompt": prompt, "input_ids": list(input_ids), "labels": list(labels),
            "reference": reference, "tool_call": tool_call, "max_new_tokens": max_new_tokens,
            "probe_kind": probe_kind, "user": user}


def task_items(rows: list[dict], tokenizer, cfg: OikyoConfig) -> list[dict]:
    """Test rows (input_ids, labels, messages and meta JSON from the data stage) as task items."""
    items = []
    for i, r in enumerate(rows[: cfg.eval.max_samples]):
        conv = json.loads(r["messages"])
        meta = json.loads(r.get("meta") or "{}")
        last = conv[-1]
        user = next((m["content"] for m in reversed(conv[:-1]) if m["role"] == "user"), "")
        items.append(_item(f"task-{i}", "task", render_prompt(tokenizer, conv[:-1], meta.get("tools")),
                           r["input_ids"], r["labels"], last["content"], bool(last.get("tool_call")),
                           cfg.eval.max_new_tokens, user=user))
    return items


def general_items(tokenizer, cfg: OikyoConfig) -> list[dict]:
    """The general-text slice cut into chunks of eval.general_chunk_tokens tokens (loss on all)."""
    from oikyo_ray.errors import DataError

    path = Path(cfg.eval.general_text).expanduser() if cfg.eval.general_text else ASSETS / "general_text.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read the general-text slice {path}: {e.strerror}",
                        hint="check eval.general_text, or set eval.forgetting=false") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = cfg.eval.general_chunk_tokens
    chunks = [ids[i:i + n] for i in range(0, len(ids), n)]
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise DataError(f"the general-text slice {path} is empty", hint="or set eval.forgetting=false")
    return [_item(f"general-{i}", "general", input_ids=c, labels=c) for i, c in enumerate(chunks)]


def probe_items(tokenizer, cfg: OikyoConfig) -> list[dict]:
    out = []
    for p in load_probes(cfg.eval.probes_path):
        msgs = ([{"role": "system", "content": p["system"]}] if p.get("system") else []) + [
            {"role": "user", "content": p["prompt"]}]
        out.append(_item(f"probe-{p['id']}", "probe", render_prompt(tokenizer, msgs),
                         max_new_tokens=cfg.eval.probe_max_new_tokens, probe_kind=p["kind"], user=p["prompt"]))
    return out


def build_items(cfg: OikyoConfig, tokenizer, rows: list[dict]) -> list[dict]:
    items = task_items(rows, tokenizer, cfg)
    if cfg.eval.forgetting:
        items += general_items(tokenizer, cfg)
    if cfg.eval.probes:
        items += probe_items(tokenizer, cfg)
    return items


# ---- scoring ------------------------------------------------------------------------------------

@torch.no_grad()
def row_nll(model, input_ids: list[list[int]], labels: list[list[int]], pad_id: int) -> list[tuple[float, int]]:
    """(summed next-token NLL over labelled tokens, their count) per row; a token-weighted mean of
    these is exactly `train.loop.eval_loss` (Hugging Face's shifted cross-entropy)."""
    n = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), n), pad_id, dtype=torch.long)
    lab = torch.full((len(input_ids), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(input_ids), n), dtype=torch.long)
    for i, (a, b) in enumerate(zip(input_ids, labels)):
        ids[i, : len(a)], lab[i, : len(b)], mask[i, : len(a)] = torch.tensor(a), torch.tensor(b), 1
    dev = model.device
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
    tgt = lab[:, 1:].to(dev)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), tgt, ignore_index=IGNORE, reduction="none")
    return list(zip(ce.sum(1).tolist(), (tgt != IGNORE).sum(1).tolist()))


def score_batch(pair, items: list[dict], ec, models=MODELS) -> list[dict]:
    """Per item and model: NLL and token count (items with labels) and generated text (items with
    a prompt); generation is seeded identically for each model and each group of prompts."""
    tok = pair.tokenizer
    out = [{"id": it["id"]} for it in items]
    loss_idx = [i for i, it in enumerate(items) if len(it["labels"]) > 0]
    gen_groups: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        if it["prompt"]:
            gen_groups.setdefault(int(it["max_new_tokens"]), []).append(i)
    for which in models:
        with pair.use(which) as model:
            if loss_idx:
                nll = row_nll(model, [list(items[i]["input_ids"]) for i in loss_idx],
                              [list(items[i]["labels"]) for i in loss_idx], tok.pad_token_id)
                for i, (s, n) in zip(loss_idx, nll):
                    out[i][f"{which}_nll"], out[i]["tokens"] = float(s), int(n)
            for budget, idx in sorted(gen_groups.items()):
                gens = generate(model, tok, [items[i]["prompt"] for i in idx], budget, ec.temperature,
                                ec.top_p, seed=ec.seed)
                for i, g in zip(idx, gens):
                    out[i][f"{which}_text"] = g["text"]
    for o in out:
        for which in models:
            o.setdefault(f"{which}_nll", 0.0)
            o.setdefault(f"{which}_text", "")
        o.setdefault("tokens", 0)
    return out


def score_local(pair, items: list[dict], ec, models=MODELS) -> list[dict]:
    out = []
    for i in range(0, len(items), ec.batch_size):
        out += score_batch(pair, items[i:i + ec.batch_size], ec, models)
    return out


# ---- the report ---------------------------------------------------------------------------------

def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def _loss(items: list[dict], outs: dict, which: str) -> tuple[float, int]:
    nll = sum(outs[it["id"]][f"{which}_nll"] for it in items)
    n = sum(outs[it["id"]]["tokens"] for it in items)
    return (nll / n if n else float("nan")), n


def summarise(cfg: OikyoConfig, items: list[dict], outputs: list[dict]) -> dict:
    """The report (without gates): metrics per model, deltas, forgetting, probes, samples."""
    ec = cfg.eval
    outs = {o["id"]: o for o in outputs}
    task = [it for it in items if it["kind"] == "task"]
    refs = [it["reference"] for it in task]
    tools = [bool(it["tool_call"]) for it in task]
    names = choose_metrics(ec.metrics, refs, tools)
    report: dict = {"metrics": names}
    for which in MODELS:
        loss, _ = _loss(task, outs, which)
        scores = score(names, [outs[it["id"]][f"{which}_text"] for it in task], refs, tools)
        report[which] = {"loss": loss, "perplexity": _ppl(loss), **{k: v["value"] for k, v in scores.items()},
                         "n": len(task)}
        report["metric_n"] = {k: v["n"] for k, v in scores.items()}
    report["delta"] = {k: report["tuned"][k] - report["base"][k] for k in ["loss", "perplexity", *names]}

    general = [it for it in items if it["kind"] == "general"]
    if general:
        (bl, n), (tl, _) = _loss(general, outs, "base"), _loss(general, outs, "tuned")
        bp, tp = _ppl(bl), _ppl(tl)
        rel = tp / bp - 1.0 if math.isfinite(bp) and math.isfinite(tp) and bp > 0 else float("inf")
        report["forgetting"] = {
            "source": ec.general_text or "oikyo_ray/eval/assets/general_text.txt", "tokens": n,
            "base_loss": bl, "tuned_loss": tl, "base_perplexity": bp, "tuned_perplexity": tp,
            "relative_increase": rel, "threshold": ec.max_forgetting, "flagged": not rel <= ec.max_forgetting,
        }

    probes = [it for it in items if it["kind"] == "probe"]
    if probes:
        scorer = ProbeScorer(ec.refusal_phrases_path, ec.toxic_lexicon_path)
        plist = [{"kind": it["probe_kind"]} for it in probes]
        rates = {w: probe_rates(plist, [outs[it["id"]][f"{w}_text"] for it in probes], scorer) for w in MODELS}
        kinds = {}
        for kind, b in rates["base"].items():
            t = rates["tuned"][kind]
            drop = b["rate"] - t["rate"]
            kinds[kind] = {"base": b["rate"], "tuned": t["rate"], "delta": t["rate"] - b["rate"], "n": b["n"],
                           "regressed": drop > ec.max_probe_drop}
        report["probes"] = {
            "source": ec.probes_path or "oikyo_ray/eval/assets/probes.jsonl", "threshold": ec.max_probe_drop,
            "kinds": kinds,
            "samples": [{"id": it["id"], "kind": it["probe_kind"], "prompt": it["user"],
                         **{w: outs[it["id"]][f"{w}_text"] for w in MODELS},
                         **{f"{w}_pass": scorer.passes(it["probe_kind"], outs[it["id"]][f"{w}_text"]) for w in MODELS}}
                        for it in probes],
        }
    report["samples"] = [{"prompt": it["user"], "reference": it["reference"],
                          "base": outs[it["id"]]["base_text"], "tuned": outs[it["id"]]["tuned_text"]}
                         for it in task[: ec.num_samples]]
    report["decoding"] = {"temperature": ec.temperature, "top_p": ec.top_p, "seed": ec.seed,
                          "max_new_tokens": ec.max_new_tokens, "probe_max_new_tokens": ec.probe_max_new_tokens}
    return report


def choose_backend(cfg: OikyoConfig, n_items: int) -> str:
    if cfg.eval.backend != "auto":
        return cfg.eval.backend
    try:
        import ray
    except ImportError:
        return "local"
    return "ray" if ray.is_initialized() and n_items >= cfg.eval.ray_min_items else "local"


def compare(cfg: OikyoConfig, model_path: str, tuned_dir: str | Path, rows: list[dict],
            backend: str | None = None) -> dict:
    """Report dict: base and fine-tuned on the same items and decoding, deltas, forgetting,
    probes, samples and gates. `backend` (local | ray) overrides eval.backend."""
    import time

    from oikyo_ray.eval.gates import evaluate_gates
    from oikyo_ray.model.load import load_tokenizer

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model, model_path)
    items = build_items(cfg, tokenizer, rows)
    backend = backend or choose_backend(cfg, len(items))
    if backend == "ray":
        from oikyo_ray.eval.distributed import score_ray

        outputs = score_ray(cfg, model_path, str(tuned_dir), items)
    else:
        pair = ModelPair(cfg, model_path, tuned_dir)
        outputs = score_local(pair, items, cfg.eval)
    report = summarise(cfg, items, outputs)
    report["gates"] = evaluate_gates(report, cfg.eval)
    report["passed"] = all(g["passed"] for g in report["gates"])
    report["backend"] = backend
    report["base_model"] = cfg.model.name_or_path
    report["tuned_dir"] = str(tuned_dir)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def evaluate_model(model, tokenizer, rows: list[dict], cfg: OikyoConfig) -> tuple[dict, list[str]]:
    """Metrics of one model on test rows (each with input_ids/labels/messages); and its answers."""
    items = task_items(rows, tokenizer, cfg)
    outs = score_local(SingleModel(model, tokenizer), items, cfg.eval, models=("tuned",))
    by_id = {o["id"]: o for o in outs}
    loss, _ = _loss(items, by_id, "tuned")
    preds = [o["tuned_text"] for o in outs]
    refs, tools = [it["reference"] for it in items], [bool(it["tool_call"]) for it in items]
    names = choose_metrics(cfg.eval.metrics, refs, tools)
    scores = score(names, preds, refs, tools)
    return {"loss": loss, "perplexity": _ppl(loss), **{k: v["value"] for k, v in scores.items()},
            "n": len(items)}, preds


def _fmt(x) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.4f}")
    return str(x)


def format_table(report: dict) -> str:
    """Markdown side-by-side table of base vs fine-tuned: value, delta and gate result per metric."""
    b, t = report["base"], report["tuned"]
    gates: dict[str, list[dict]] = {}
    for g in report.get("gates", []):
        if g.get("metric"):
            gates.setdefault(g["metric"], []).append(g)
    lines = ["| metric | base | fine-tuned | delta | gate |", "|---|---|---|---|---|"]
    for k in ["loss", "perplexity", *report.get("metrics", ["exact_match", "token_f1"])]:
        d = t[k] - b[k] if math.isfinite(t[k]) and math.isfinite(b[k]) else float("nan")
        gate = ", ".join(f"{'pass' if g['passed'] else 'FAIL'} ({g['rule']})" for g in gates.get(k, []))
        n = report.get("metric_n", {}).get(k)
        name = k if n is None or n == b["n"] else f"{k} (n={n})"
        lines.append(f"| {name} | {_fmt(b[k])} | {_fmt(t[k])} | {_fmt(d)} | {gate} |")
    f = report.get("forgetting")
    if f:
        lines.append(f"| general-text perplexity (forgetting) | {_fmt(f['base_perplexity'])} | "
                     f"{_fmt(f['tuned_perplexity'])} | {f['relative_increase']:+.1%} | "
                     f"{'FLAGGED' if f['flagged'] else 'pass'} (rise <= {f['threshold']:.0%}) |")
    for kind, p in (report.get("probes") or {}).get("kinds", {}).items():
        lines.append(f"| probe pass rate: {kind} (n={p['n']}) | {p['base']:.3f} | {p['tuned']:.3f} | "
                     f"{p['delta']:+.3f} | {'FAIL' if p['regressed'] else 'pass'} "
                     f"(drop <= {report['probes']['threshold']}) |")
    lines.append(f"\n{b['n']} test rows; gates {'passed' if report.get('passed', True) else 'FAILED'}.")
    return "\n".join(lines)
