"""Training throughput: oikyo on Ray Train vs a plain PyTorch loop vs HF Trainer + PEFT.

Run as: python bench/train_throughput.py [--steps 60] [--batch 16] [--repeat 2]
Same model (the embedded tiny Llama unless --model), same tokenised rows, same global batch, LoRA
r=16 on all linear layers, AdamW. Steady-state tokens/s (non-pad tokens; the first steps are
excluded as warm-up) and peak memory (each contender in its own process). Every process computes
with one torch thread (oversubscribed OpenMP threads make a shared 2-core machine erratic): plain
loop, HF Trainer and oikyo 1 worker use one core, oikyo 2 workers use two.
Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WARMUP = 5
LR, SEED = 3e-3, 42


def rows(model_path: str) -> list[dict]:
    from transformers import AutoTokenizer

    from oikyo_ray.data.tokenize import encode_messages
    from oikyo_ray.demo.tasks import ASSET

    tok = AutoTokenizer.from_pretrained(model_path)
    out = []
    for line in ASSET.open(encoding="utf-8"):
        e = encode_messages(tok, json.loads(line)["messages"], max_length=64)
        out.append({"input_ids": e["input_ids"], "labels": e["labels"]})
    return out


def peft_model(model_path: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                          LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))


def batches(data: list[dict], batch: int, steps: int, pad: int):
    from oikyo_ray.train.loop import collate, shuffled_batches

    epoch, n = 0, 0
    while True:
        for b in shuffled_batches(data, batch, SEED + epoch):
            yield collate(b, pad)
            n += 1
            if n == steps:
                return
        epoch += 1


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_plain(model_path: str, steps: int, batch: int) -> dict:
    import torch

    torch.set_num_threads(1)
    model, data = peft_model(model_path), rows(model_path)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    tokens, t0 = 0, None
    for i, b in enumerate(batches(data, batch, steps, 0)):
        if i == WARMUP:
            tokens, t0 = 0, time.perf_counter()
        out = model(**b)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
    return {"tokens_per_s": tokens / (time.perf_counter() - t0), "peak_mb": peak_mb(), "final_loss": float(out.loss)}


def run_hf(model_path: str, steps: int, batch: int) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(1)
    from oikyo_ray.train.loop import collate

    model, data = peft_model(model_path), rows(model_path)
    seen = {"tokens": 0, "t0": None, "step": 0}

    def collator(feats):
        b = collate({"input_ids": [f["input_ids"] for f in feats], "labels": [f["labels"] for f in feats]}, 0)
        if seen["t0"] is not None:
            seen["tokens"] += int(b["attention_mask"].sum())
        return b

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == WARMUP:
                seen["t0"], seen["tokens"] = time.perf_counter(), 0

    with tempfile.TemporaryDirectory() as d:
        args = TrainingArguments(output_dir=d, per_device_train_batch_size=batch, max_steps=steps, learning_rate=LR,
                                 lr_scheduler_type="constant", logging_steps=10**6, save_strategy="no",
                                 report_to=[], use_cpu=True, dataloader_num_workers=0, seed=SEED,
                                 remove_unused_columns=False, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[Clock()])
        out = trainer.train()
    # the collator runs one batch ahead of the step being timed: drop that batch's tokens
    tokens = seen["tokens"] * (steps - WARMUP) / max(1, steps - WARMUP + 1)
    return {"tokens_per_s": tokens / (time.perf_counter() - seen["t0"]), "peak_mb": peak_mb(),
            "final_loss": out.training_loss}


def run_oikyo(model_path: str, steps: int, batch: int, workers: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from oikyo_ray.cluster import init_ray
    from oikyo_ray.config import load_config
    from oikyo_ray.train.trainer import fit

    data = rows(model_path)
    root = Path(tempfile.mkdtemp(prefix="oikyo-bench-"))
    run = root / "r"
    (run / "data" / "train").mkdir(parents=True)
    pq.write_table(pa.table({k: [r[k] for r in data] for k in ("input_ids", "labels")}),
                   run / "data" / "train" / "part-0.parquet")
    per_worker = batch // workers
    cfg = load_config(None, [f"run.root={root}", "run.name=r", "eval.enabled=false", f"train.max_steps={steps}",
                              f"train.batch_size={per_worker}", f"train.lr={LR}", "train.lr_schedule=constant",
                              "train.warmup_ratio=0", "train.log_every=10", f"train.checkpoint_every={steps}",
                              f"train.epochs={steps}", f"scaling.num_workers={workers}",
                              "scaling.torch_threads=1", f"scaling.cpus_per_worker={1 / workers}"])
    init_ray(num_cpus=2)
    t0 = time.perf_counter()
    fit(cfg, run, model_path, {"counts": {"train": len(data), "val": 0, "test": 0}}, log=lambda s: None)
    wall = time.perf_counter() - t0
    ms = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = [m["tokens_per_s"] for m in ms if m["step"] > 10]  # the first window holds start-up
    return {"tokens_per_s": sum(steady) / len(steady), "peak_mb_per_worker": max(m["mem_peak_mb"] for m in ms),
            "wall_s_with_startup": wall, "final_loss": ms[-1]["loss"]}


def child(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--only", kind, "--steps", str(args.steps), "--batch", str(args.batch),
           "--model", args.model]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16, help="global batch (rows per optimizer step)")
    ap.add_argument("--model", default="")
    ap.add_argument("--repeat", type=int, default=3, help="runs per contender; the best is reported")
    ap.add_argument("--only", choices=["plain", "hf", "oikyo1", "oikyo2"])
    args = ap.parse_args()
    if not args.model:
        from oikyo_ray.model.tiny import ensure_tiny_model

        args.model = str(ensure_tiny_model("~/.cache/oikyo"))
    if args.only:
        fn = {"plain": lambda: run_plain(args.model, args.steps, args.batch),
              "hf": lambda: run_hf(args.model, args.steps, args.batch),
              "oikyo1": lambda: run_oikyo(args.model, args.steps, args.batch, 1),
              "oikyo2": lambda: run_oikyo(args.model, args.steps, args.batch, 2)}[args.only]
        print(json.dumps(fn()))
        return
    from bench._common import write_result

    # a shared 2-core machine is noisy: each contender runs --repeat times (interleaved), best kept
    runs: dict[str, list[dict]] = {k: [] for k in ("plain", "hf", "oikyo1", "oikyo2")}
    for _ in range(args.repeat):
        for k in runs:
            runs[k].append(child(k, args))
    res = {k: dict(max(v, key=lambda r: r["tokens_per_s"]), all_tokens_per_s=[r["tokens_per_s"] for r in v])
           for k, v in runs.items()}
    write_result("train_throughput", "tokens/s (higher is better)", res["oikyo1"]["tokens_per_s"],
                 res["plain"]["tokens_per_s"], "plain PyTorch loop (same model, rows, batch, LoRA, AdamW)",
                 res["oikyo1"]["tokens_per_s"] / res["plain"]["tokens_per_s"],
                 "oikyo 1 worker >= 0.8 x plain loop (steady state)",
                 steps=args.steps, global_batch=args.batch, model=args.model, repeat=args.repeat,
                 note="tiny model: per-step work is ~10 ms, so fixed costs (Ray Train report every "
                      "train.log_every=10 steps, worker processes) weigh far more than on a real model",
                 hf_trainer_peft=res["hf"], plain_loop=res["plain"], oikyo_1_worker=res["oikyo1"],
                 oikyo_2_workers=res["oikyo2"],
                 ratio_vs_hf_trainer=res["oikyo1"]["tokens_per_s"] / res["hf"]["tokens_per_s"],
                 ratio_2_vs_1_workers=res["oikyo2"]["tokens_per_s"] / res["oikyo1"]["tokens_per_s"])


if __name__ == "__main__":
    main()
