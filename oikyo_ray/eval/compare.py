"""Base vs fine-tuned on the held-out test split: loss/perplexity and generation metrics (Ray-free)."""

from __future__ import annotations

import json
import math

import torch

from oikyo_ray.config import OikyoConfig
from oikyo_ray.data.tokenize import render_prompt
from oikyo_ray.eval.generate import generate
from oikyo_ray.eval.metrics import exact_match, token_f1
from oikyo_ray.train.loop import collate, eval_loss


def evaluate_model(model, tokenizer, rows: list[dict], cfg: OikyoConfig) -> tuple[dict, list[str]]:
    """Metrics of one model on test rows (each with input_ids/labels/messages); and its answers."""
    ec = cfg.eval
    rows = rows[: ec.max_samples]
    batches = [collate({"input_ids": [r["input_ids"] for r in rows[i:i + ec.batch_size]],
                        "labels": [r["labels"] for r in rows[i:i + ec.batch_size]]}, tokenizer.pad_token_id)
               for i in range(0, len(rows), ec.batch_size)]
    loss = eval_loss(model, batches)
    convs = [json.loads(r["messages"]) for r in rows]
    prompts = [render_prompt(tokenizer, c[:-1]) for c in convs]
    refs = [c[-1]["content"] for c in convs]
    preds = []
    model.eval()
    for i in range(0, len(prompts), ec.batch_size):
        preds += [g["text"] for g in generate(model, tokenizer, prompts[i:i + ec.batch_size], ec.max_new_tokens)]
    n = max(1, len(rows))
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 50 else float("inf"),
        "exact_match": sum(exact_match(p, r) for p, r in zip(preds, refs)) / n,
        "token_f1": sum(token_f1(p, r) for p, r in zip(preds, refs)) / n,
        "n": len(rows),
    }, preds


def load_tuned(base, cfg: OikyoConfig, tuned_dir: str):
    """The fine-tuned model: the adapter in `tuned_dir` on `base`, or full weights from it."""
    if cfg.method.type == "full":
        from oikyo_ray.model.load import load_model

        return load_model(cfg.model, tuned_dir)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, tuned_dir)


def compare(cfg: OikyoConfig, model_path: str, tuned_dir: str, rows: list[dict]) -> dict:
    """Report dict: metrics of base and fine-tuned on the same rows and decoding, deltas, samples."""
    from oikyo_ray.model.load import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model, model_path)
    base = load_model(cfg.model, model_path)
    torch.manual_seed(cfg.train.seed)
    base_m, base_p = evaluate_model(base, tokenizer, rows, cfg)
    tuned = load_tuned(base, cfg, tuned_dir)  # peft wraps `base` in place: evaluate base first
    tuned_m, tuned_p = evaluate_model(tuned, tokenizer, rows, cfg)
    samples = []
    for r, b, t in list(zip(rows, base_p, tuned_p))[:10]:
        conv = json.loads(r["messages"])
        samples.append({"prompt": conv[-2]["content"] if len(conv) > 1 else "",
                        "reference": conv[-1]["content"], "base": b, "tuned": t})
    return {"base": base_m, "tuned": tuned_m,
            "delta": {k: tuned_m[k] - base_m[k] for k in ("loss", "exact_match", "token_f1")},
            "samples": samples}


def format_table(report: dict) -> str:
    """Markdown side-by-side table of base vs fine-tuned."""
    b, t = report["base"], report["tuned"]
    lines = ["| metric | base | fine-tuned | delta |", "|---|---|---|---|"]
    for k in ("loss", "perplexity", "exact_match", "token_f1"):
        d = t[k] - b[k] if math.isfinite(t[k]) and math.isfinite(b[k]) else float("nan")
        lines.append(f"| {k} | {b[k]:.4f} | {t[k]:.4f} | {d:+.4f} |")
    lines.append(f"\n{b['n']} test rows.")
    return "\n".join(lines)
