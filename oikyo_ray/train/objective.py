"""The loss a training step minimises, per method.objective (Ray-free): batches and model calls
around the losses of `preference.py`.

    collate_pairs(batch, pad_id)   rows with prompt/chosen/rejected ids -> one padded batch of
                                   2B sequences, the chosen ones first, loss on responses only
    collate_kto(batch, pad_id)     KTO rows (or pairs, split in two) and their mismatched pairs
    step_loss(cfg.method)          (model, batch) -> (loss, count), what `loop.train_loop` calls:
                                   None (`loop.loss_on`) for sft, `pair_loss`, `kto_step`

The reference of dpo, ipo and kto is the model being trained with its adapters disabled (peft), so a
LoRA/DoRA/QLoRA run needs no second copy of the base; config.py refuses a full fine-tune with a
reference objective until precomputed reference log-probs exist. ORPO and SimPO need none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import numpy as np
import torch

from oikyo_ray.config import PAIRWISE, MethodConfig
from oikyo_ray.data.tokenize import IGNORE
from oikyo_ray.train import preference as pref

StepLoss = Callable[[object, dict], tuple[torch.Tensor, torch.Tensor]]
PAIR_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]  # what pairwise training reads of a split


def _sequences(prompts: list, responses: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + response sequences, labels on the response tokens only."""
    n = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = np.full((len(prompts), n), pad_id, dtype=np.int64)
    labels = np.full((len(prompts), n), IGNORE, dtype=np.int64)
    mask = np.zeros((len(prompts), n), dtype=np.int64)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        p, r = np.asarray(p, dtype=np.int64), np.asarray(r, dtype=np.int64)
        ids[i, : len(p)], ids[i, len(p) : len(p) + len(r)] = p, r
        labels[i, len(p) : len(p) + len(r)] = r
        mask[i, : len(p) + len(r)] = 1
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(mask),
        "num_tokens": torch.from_numpy(mask.sum(1)),
    }


def collate_pairs(batch: dict, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of (prompt, chosen, rejected) ids as 2B right-padded sequences prompt + response:
    rows 0..B-1 the chosen, B..2B-1 the rejected (one forward scores both); labels are the
    response tokens, the prompt and padding IGNORE. `num_tokens` counts real tokens per sequence."""
    prompts = list(batch["prompt_ids"])
    # the shared prompt, tokenised once in the data, used twice here
    return _sequences(prompts + prompts, [*batch["chosen_ids"], *batch["rejected_ids"]], pad_id)


def collate_kto(batch: dict, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows for KTO as 2N sequences: N (prompt, completion) with `desirable` (a pair row gives two:
    its chosen desirable, its rejected not), then the same prompts each with the previous row's
    completion: the mismatched pairs KTO's KL estimate is taken on (TRL pairs them the same way).
    `num_tokens` counts the first N only (the mismatched ones are scored without gradients)."""
    prompts, completions, desirable = [], [], []
    for p, c, r, d in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], batch["desirable"]):
        if len(r):
            prompts += [p, p]
            completions += [c, r]
            desirable += [True, False]
        else:
            prompts.append(p)
            completions.append(c)
            desirable.append(bool(d == 1))
    out = _sequences(prompts + prompts, completions + completions[-1:] + completions[:-1], pad_id)
    out["num_tokens"] = out["num_tokens"][: len(prompts)]
    out["desirable"] = torch.tensor(desirable)
    return out


def has_pair(row: dict) -> bool:
    """Whether a row's pair fits (data/curate.py leaves the ids empty when the prompt leaves no room)."""
    return len(row["prompt_ids"]) > 0 and len(row["chosen_ids"]) > 0 and len(row["rejected_ids"]) > 0


def has_kto_row(row: dict) -> bool:
    """Whether a row can train KTO: a labelled completion, or a pair, that fits."""
    return len(row["prompt_ids"]) > 0 and len(row["chosen_ids"]) > 0 and (row["desirable"] != -1 or has_pair(row))


def sequence_logps_of(model, batch: dict[str, torch.Tensor]) -> pref.SequenceLogps:
    """Per-sequence log-probs of a collated batch's labelled tokens under `model`."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return pref.sequence_logps(out.logits, batch["labels"])


def _base(model):
    """The module under a strategy's wrapper (DDP, DeepSpeed: `.module`; FSDP2 wraps in place)."""
    return getattr(model, "module", model)


@torch.no_grad()
def reference_logps(model, batch: dict[str, torch.Tensor]) -> pref.SequenceLogps:
    """Log-probs under the reference: the same model with its adapters disabled. Called on the
    unwrapped module: without gradients, DDP has nothing to synchronise."""
    base = _base(model)
    disable = getattr(base, "disable_adapter", None)
    if disable is None:
        raise ValueError("a reference objective needs a peft model (method.type lora/dora/qlora)")
    with disable():
        return sequence_logps_of(base, batch)


def pair_loss(model, batch: dict[str, torch.Tensor], method: MethodConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, pairs) of a collated pair batch under a pairwise objective (method.objective)."""
    policy = sequence_logps_of(model, batch)
    half = len(batch["input_ids"]) // 2
    chosen, rejected = slice(0, half), slice(half, None)
    beta, objective = method.preference_beta, method.objective
    c, r = policy.mean[chosen], policy.mean[rejected]  # length-normalised: ipo, orpo, simpo
    if objective == "dpo":
        ref = reference_logps(model, batch)
        out = pref.dpo_loss(
            policy.sum[chosen],
            policy.sum[rejected],
            ref.sum[chosen],
            ref.sum[rejected],
            beta=beta,
            label_smoothing=method.label_smoothing,
        )
    elif objective == "ipo":
        ref = reference_logps(model, batch)
        out = pref.ipo_loss(c, r, ref.mean[chosen], ref.mean[rejected], beta=beta)
    elif objective == "orpo":
        # the NLL term: token-mean next-token loss over the chosen responses
        nll = -policy.sum[chosen].sum() / policy.tokens[chosen].sum().clamp(min=1)
        out = pref.orpo_loss(c, r, nll, beta=beta)
    elif objective == "simpo":
        out = pref.simpo_loss(c, r, beta=beta, gamma=method.simpo_gamma, label_smoothing=method.label_smoothing)
    else:
        raise ValueError(f"method.objective={objective} is not a pairwise objective")
    return out.loss, torch.tensor(half, device=out.loss.device)


def _rows(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {k: batch[k][rows] for k in ("input_ids", "labels", "attention_mask")}


def kto_step(model, batch: dict[str, torch.Tensor], method: MethodConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, rows) of a `collate_kto` batch: policy and reference log-probs of the real
    completions, and the KL reference point from the mismatched ones (no gradient through it)."""
    n = len(batch["desirable"])
    real, mismatched = slice(0, n), slice(n, None)
    policy = sequence_logps_of(model, _rows(batch, real))
    with torch.no_grad():
        policy_kl = sequence_logps_of(model, _rows(batch, mismatched))
    ref = reference_logps(model, batch)
    kl = pref.kto_kl(policy_kl.sum, ref.sum[mismatched])
    out = pref.kto_loss(
        policy.sum,
        ref.sum[real],
        batch["desirable"],
        kl,
        beta=method.preference_beta,
        desirable_weight=method.kto_desirable_weight,
        undesirable_weight=method.kto_undesirable_weight,
    )
    return out.loss, torch.tensor(n, device=out.loss.device)


def step_loss(method: MethodConfig) -> StepLoss | None:
    """The loss function of a training step for method.objective; None: the loop's default (sft)."""
    if method.objective in PAIRWISE:
        return partial(pair_loss, method=method)
    if method.objective == "kto":
        return partial(kto_step, method=method)
    return None


def batch_collate(method: MethodConfig) -> Callable[[dict, int], dict[str, torch.Tensor]] | None:
    """How rows become a batch for method.objective; None: the loop's `collate` (sft)."""
    if method.objective in PAIRWISE:
        return collate_pairs
    return collate_kto if method.objective == "kto" else None


def row_columns(method: MethodConfig) -> list[str]:
    """What training reads of a split for method.objective (preference rows' columns or sft's)."""
    if method.objective in PAIRWISE:
        return PAIR_COLUMNS
    return [*PAIR_COLUMNS, "desirable"] if method.objective == "kto" else ["input_ids", "labels"]


@torch.no_grad()
def preference_accuracy(model, batches: Iterable[dict[str, torch.Tensor]], mean: bool = False) -> float:
    """Share of pairs whose chosen response the model gives a higher log-prob than the rejected
    one (summed over the response tokens, or per-token means with `mean`)."""
    was_training = model.training
    model.eval()
    right = total = 0
    for b in batches:
        lp = sequence_logps_of(model, b)
        score = lp.mean if mean else lp.sum
        half = len(score) // 2
        right += int((score[:half] > score[half:]).sum())
        total += half
    model.train(was_training)
    return right / total if total else float("nan")
