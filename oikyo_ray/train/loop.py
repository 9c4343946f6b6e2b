"""The training loop as plain functions: collate, optimiser, schedule, step, eval, loop (Ray-free).

`train_loop` takes iterables of batches and two callbacks (report, checkpoint), so the same code
runs under Ray Train, in a plain process, or on a GPU box without Ray.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from oikyo_ray.config import TrainConfig
from oikyo_ray.data.tokenize import IGNORE


def collate(batch: dict, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of variable-length rows (dict of arrays of lists) to its longest row."""
    ids = [np.asarray(x, dtype=np.int64) for x in batch["input_ids"]]
    labels = [np.asarray(x, dtype=np.int64) for x in batch["labels"]]
    n = max(len(x) for x in ids)
    out_ids = np.full((len(ids), n), pad_id, dtype=np.int64)
    out_lab = np.full((len(ids), n), IGNORE, dtype=np.int64)
    mask = np.zeros((len(ids), n), dtype=np.int64)
    for i, (a, b) in enumerate(zip(ids, labels)):
        out_ids[i, : len(a)], out_lab[i, : len(b)], mask[i, : len(a)] = a, b, 1
    return {"input_ids": torch.from_numpy(out_ids), "labels": torch.from_numpy(out_lab),
            "attention_mask": torch.from_numpy(mask)}


def shuffled_batches(rows: list[dict], batch_size: int, seed: int):
    """Seeded shuffle of in-memory rows into full batches (dict of lists), dropping the remainder."""
    order = np.random.default_rng(seed).permutation(len(rows))
    for i in range(0, len(order) - batch_size + 1, batch_size):
        chunk = [rows[j] for j in order[i:i + batch_size]]
        yield {"input_ids": [r["input_ids"] for r in chunk], "labels": [r["labels"] for r in chunk]}


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def build_scheduler(opt, cfg: TrainConfig, total_steps: int):
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def total_steps(cfg: TrainConfig, rows_per_worker: int) -> int:
    micro = rows_per_worker // cfg.batch_size
    per_epoch = max(1, micro // cfg.grad_accum)
    steps = per_epoch * cfg.epochs
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def loss_on(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token loss over labelled tokens, and how many tokens that was."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    return out.loss, n


@torch.no_grad()
def eval_loss(model, batches: Iterable[dict], all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Token-weighted mean loss over `batches`, summed across workers by `all_reduce`."""
    was_training = model.training
    model.eval()
    acc = torch.zeros(2, dtype=torch.float64)
    for b in batches:
        loss, n = loss_on(model, b)
        acc += torch.tensor([float(loss) * n, n], dtype=torch.float64)
    if all_reduce is not None:
        acc = all_reduce(acc)
    model.train(was_training)
    return float(acc[0] / acc[1]) if acc[1] > 0 else float("nan")


@dataclass
class LoopHooks:
    """What the loop calls out to; defaults do nothing (a bare local run)."""

    report: Callable[[dict, bool], None] = lambda metrics, checkpoint: None
    val_batches: Callable[[], Iterable[dict]] | None = None
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    world_size: int = 1


def train_loop(model, train_epochs: Callable[[int], Iterable[dict]], cfg: TrainConfig,
               steps: int, hooks: LoopHooks, eval_model=None) -> dict:
    """Run `steps` optimiser steps over `train_epochs(epoch)` batches; return the last metrics.

    `hooks.report(metrics, checkpoint)` is called every log/eval/checkpoint step; the caller
    saves the checkpoint when asked. `eval_model` is the unwrapped model (no DDP hooks).
    """
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps)
    eval_model = eval_model or model
    model.train()
    step, epoch, tokens, t0 = 0, 0, 0, time.perf_counter()
    metrics: dict = {}
    while step < steps:
        micro = 0
        for batch in train_epochs(epoch):
            loss, n = loss_on(model, batch)
            (loss / cfg.grad_accum).backward()
            tokens += int(batch["attention_mask"].sum())
            micro += 1
            if micro % cfg.grad_accum:
                continue
            params = [p for p in model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            metrics = {"step": step, "epoch": epoch, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0],
                       "grad_norm": float(grad_norm)}
            do_eval = hooks.val_batches is not None and (step % cfg.eval_every == 0 or step == steps)
            if do_eval:
                metrics["val_loss"] = eval_loss(eval_model, hooks.val_batches(), hooks.all_reduce)
            do_ckpt = step % cfg.checkpoint_every == 0 or step == steps
            if step % cfg.log_every == 0 or do_eval or do_ckpt:
                dt = time.perf_counter() - t0
                metrics["tokens_per_s"] = tokens * hooks.world_size / max(dt, 1e-9)
                tokens, t0 = 0, time.perf_counter()
                hooks.report(metrics, do_ckpt)
            if step >= steps:
                break
        epoch += 1
    return metrics
