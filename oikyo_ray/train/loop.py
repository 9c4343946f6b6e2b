"""The training loop as plain functions: collate, optimiser, schedule, step, eval, loop (Ray-free).

`train_loop` takes iterables of batches, an engine (engine.py: local, DDP, FSDP2, DeepSpeed) and
hooks (report + checkpoint state, per-step), so the same code runs under Ray Train, in a plain
process, or on a GPU box without Ray; checkpoint.py writes and restores what a resume needs.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from oikyo_ray.config import TrainConfig
from oikyo_ray.data.tokenize import IGNORE
from oikyo_ray.train.checkpoint import TrainState
from oikyo_ray.train.engine import TorchEngine, build_optimizer, build_scheduler  # noqa: F401 (re-exported)

try:
    import resource
except ImportError:  # pragma: no cover - Windows has no getrusage
    resource = None  # type: ignore[assignment]

StepHook = Callable[[TrainState], None]
# fit(step_hook=...): called on each worker with its rank; what it returns (or None) is that worker's
# LoopHooks.on_step. It travels to the workers pickled: a module-level function or a functools.partial.
StepHookFactory = Callable[[int], StepHook | None]


def collate(batch: dict, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of variable-length rows (dict of arrays of lists) to its longest row, or
    stack packed blocks (rows with `position_ids`, all one length: no attention mask, so the model
    masks across samples from the restarting positions; see data/packing.py).
    `num_tokens` counts the real (non-pad) tokens of each row."""
    if "position_ids" in batch:
        out = {
            k: torch.from_numpy(np.stack([np.asarray(x, dtype=np.int64) for x in batch[k]]))
            for k in ("input_ids", "labels", "position_ids")
        }
        out["num_tokens"] = torch.as_tensor(np.asarray(batch["num_tokens"], dtype=np.int64))
        return out
    ids = [np.asarray(x, dtype=np.int64) for x in batch["input_ids"]]
    labels = [np.asarray(x, dtype=np.int64) for x in batch["labels"]]
    n = max(len(x) for x in ids)
    out_ids = np.full((len(ids), n), pad_id, dtype=np.int64)
    out_lab = np.full((len(ids), n), IGNORE, dtype=np.int64)
    mask = np.zeros((len(ids), n), dtype=np.int64)
    for i, (a, b) in enumerate(zip(ids, labels)):
        out_ids[i, : len(a)], out_lab[i, : len(b)], mask[i, : len(a)] = a, b, 1
    return {
        "input_ids": torch.from_numpy(out_ids),
        "labels": torch.from_numpy(out_lab),
        "attention_mask": torch.from_numpy(mask),
        "num_tokens": torch.from_numpy(mask.sum(1)),
    }


def shuffled_batches(rows: list[dict], batch_size: int, seed: int):
    """Seeded shuffle of in-memory rows into full batches (dict of lists), dropping the remainder."""
    order = np.random.default_rng(seed).permutation(len(rows))
    for i in range(0, len(order) - batch_size + 1, batch_size):
        chunk = [rows[j] for j in order[i : i + batch_size]]
        yield {k: [r[k] for r in chunk] for k in rows[0]}


def loss_on(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token loss over labelled tokens, and how many tokens that was (a 0-d tensor on
    the batch's device: reading it would wait for the device). Packed batches carry position_ids
    and no attention mask; the KV cache stays off, or transformers would not derive the
    per-sample mask from the positions."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in batch}
    out = model(**inputs, use_cache=False)
    return out.loss, (batch["labels"][:, 1:] != IGNORE).sum()


StepLoss = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (model, batch) -> (mean loss, what it averaged)


@torch.no_grad()
def eval_loss(
    model,
    batches: Iterable[dict],
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    step_loss: StepLoss = loss_on,
) -> float:
    """Token- (or pair-) weighted mean loss over `batches`, summed across workers by `all_reduce`."""
    was_training = model.training
    model.eval()
    acc = torch.zeros(2, dtype=torch.float64)
    for b in batches:
        loss, count = step_loss(model, b)
        n = int(count)
        acc += torch.tensor([float(loss) * n, n], dtype=torch.float64)
    if all_reduce is not None:
        acc = all_reduce(acc)
    model.train(was_training)
    return float(acc[0] / acc[1]) if acc[1] > 0 else float("nan")


@dataclass
class LoopHooks:
    """What the loop calls out to; defaults do nothing (a bare local run).

    `report(metrics, ckpt)`: every log/eval/checkpoint step; `ckpt` is the TrainState to save with
    this report (all ranks get it: saving may be collective), or None. `on_step(state)` runs after
    every optimizer step, before its report (fault injection in tests, profiling)."""

    report: Callable[[dict, TrainState | None], None] = lambda metrics, ckpt: None
    val_batches: Callable[[], Iterable[dict]] | None = None
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    world_size: int = 1
    on_step: StepHook | None = None
    eval_at_checkpoint: bool = False  # every checkpoint carries val_loss (checkpoint score)


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocations when on GPU, else the peak resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    if resource is None:  # pragma: no cover - Windows
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _improved(state: TrainState, val: float, cfg: TrainConfig) -> bool:
    better = val < state.best_val - cfg.early_stopping_min_delta
    if val < state.best_val:
        state.best_val, state.best_step = val, state.step
    return better


def train_loop(
    model,
    train_epochs: Callable[[int], Iterable[dict]],
    cfg: TrainConfig,
    steps: int,
    hooks: LoopHooks,
    eval_model=None,
    engine=None,
    state: TrainState | None = None,
    step_loss: StepLoss | None = None,
) -> dict:
    """Run optimiser steps up to `steps` over `train_epochs(epoch)` batches; return the last metrics.

    `engine` (engine.py) wraps the model for its strategy; default: this process alone. `state`
    resumes a checkpointed run: its epoch's first `state.micro` batches are skipped, so a run
    resumed from step k with the same data, seed and restored optimizer ends where an
    uninterrupted run would. Early stopping on val_loss (train.early_stopping_*) ends it sooner.
    `step_loss(model, batch)` is the objective (objective.step_loss); default: next-token loss.
    """
    step_loss = step_loss or loss_on
    engine = engine or TorchEngine(model, cfg, steps, wrap=False)
    eval_model = eval_model or engine.eval_model
    state = state or TrainState()
    engine.model.train()
    tokens, t0 = 0, time.perf_counter()
    metrics: dict = {}
    first_report = state.resumed_from is not None
    while state.step < steps and not state.stopped_early:
        skip, micro, losses = state.micro, 0, []
        for batch in itertools.islice(train_epochs(state.epoch), skip, None):
            last = (skip + micro + 1) % cfg.grad_accum == 0
            with engine.no_sync(last), engine.autocast():
                loss, _ = step_loss(engine.model, batch)
            grad_norm = engine.micro_step(loss, last)
            losses.append(loss.detach())  # stays on the device: no wait for it here
            tokens += int(batch["num_tokens"].sum())  # a host tensor (ray_train.py keeps it there)
            micro += 1
            if not last:
                continue
            state.step += 1
            state.micro = skip + micro
            step_losses, losses = losses, []
            if hooks.on_step is not None:
                hooks.on_step(state)
            do_ckpt = state.step % cfg.checkpoint_every == 0 or state.step == steps
            do_eval = hooks.val_batches is not None and (
                state.step % cfg.eval_every == 0 or state.step == steps or (do_ckpt and hooks.eval_at_checkpoint)
            )
            evaluated: dict = {}
            if do_eval and hooks.val_batches is not None:
                with engine.autocast():
                    evaluated["val_loss"] = eval_loss(eval_model, hooks.val_batches(), hooks.all_reduce, step_loss)
                engine.model.train()
                if _improved(state, evaluated["val_loss"], cfg):
                    state.bad_evals = 0
                else:
                    state.bad_evals += 1
                if cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience:
                    state.stopped_early = do_ckpt = True
                    evaluated.update(stopped_early=True, best_step=state.best_step)
            if state.step % cfg.log_every == 0 or do_eval or do_ckpt:
                # loss and grad norm are read from the device only here, not on every step
                metrics = {
                    "step": state.step,
                    "epoch": state.epoch,
                    "loss": sum(float(x) for x in step_losses) / len(step_losses),
                    "lr": engine.lr(),
                    "grad_norm": float(grad_norm),
                    **evaluated,
                }
                dt = time.perf_counter() - t0
                metrics["tokens_per_s"] = tokens * hooks.world_size / max(dt, 1e-9)
                metrics["mem_peak_mb"] = peak_memory_mb()
                if first_report:
                    metrics["resumed_from"], first_report = state.resumed_from, False
                tokens, t0 = 0, time.perf_counter()
                if do_ckpt:
                    state.scheduler = engine.scheduler.state_dict()
                hooks.report(metrics, state if do_ckpt else None)
            if state.step >= steps or state.stopped_early:
                break
        else:
            # the epoch is exhausted: gradients of an unfinished accumulation window are dropped
            engine.drop_partial()
            if skip == 0 and micro < cfg.grad_accum:
                raise ValueError(
                    f"an epoch has {micro} micro-batches, fewer than train.grad_accum="
                    f"{cfg.grad_accum}: no optimizer step is possible"
                )
            state.epoch, state.micro = state.epoch + 1, 0
    return metrics
