"""Preference objectives as pure torch (Ray-free): sequence log-probs and the DPO family of losses.

    logps = sequence_logps(logits, labels)                 # (sum, mean, tokens) per row
    out = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta)  # PreferenceLoss(loss, metrics)

Every loss takes per-sequence log-probs of the response tokens (the prompt masked out with the
data stage's IGNORE label), never a model, so the same functions serve training, evaluation and
the tests that compare them with TRL. Each returns the batch-mean loss and detached per-row
rewards: `chosen_rewards` / `rejected_rewards` (the objective's implicit reward), and `metrics`
with their means, the mean margin and the preference accuracy (chosen reward above rejected).

Losses and papers:
  dpo     Rafailov et al. 2023, "Direct Preference Optimization" (arXiv:2305.18290); label
          smoothing is the conservative DPO of Mitchell 2023 ("A note on DPO with noisy preferences")
  ipo     Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
          Preferences" (arXiv:2310.12036), eq. 17, on per-token mean log-ratios as TRL does
  orpo    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
          (arXiv:2403.07691), eqs. 4-7
  simpo   Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
          (arXiv:2405.14734), eq. 6
  kto     Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
          (arXiv:2402.01306), eq. 7, with TRL's batch KL estimate
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from oikyo_ray.data.tokenize import IGNORE


@dataclass
class SequenceLogps:
    """Per-row log-probs of the labelled tokens: their sum, their mean, and how many there were."""

    sum: torch.Tensor
    mean: torch.Tensor
    tokens: torch.Tensor


@dataclass
class PreferenceLoss:
    """A batch's loss (scalar, differentiable), per-row implicit rewards (detached) and metrics."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> SequenceLogps:
    """Log-probs of `labels` under `logits` (batch, seq, vocab), summed and averaged over the
    labelled positions of each row. Position t predicts token t+1, as in the model's own loss;
    IGNORE labels (prompt, padding) count for nothing."""
    labels = labels[:, 1:]
    logits = logits[:, :-1]
    mask = labels != IGNORE
    # gather then subtract the logsumexp: the full (batch, seq, vocab) log-softmax is never built
    safe = labels.masked_fill(~mask, 0)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1).float()
    per_token = (picked - torch.logsumexp(logits.float(), dim=-1)) * mask
    tokens = mask.sum(-1)
    total = per_token.sum(-1)
    return SequenceLogps(total, total / tokens.clamp(min=1), tokens)


def _pairwise(chosen: torch.Tensor, rejected: torch.Tensor, losses: torch.Tensor) -> PreferenceLoss:
    chosen, rejected = chosen.detach(), rejected.detach()
    margins = chosen - rejected
    metrics = {
        "rewards/chosen": float(chosen.mean()),
        "rewards/rejected": float(rejected.mean()),
        "rewards/margins": float(margins.mean()),
        "rewards/accuracy": float((margins > 0).float().mean()),
    }
    return PreferenceLoss(losses.mean(), chosen, rejected, metrics)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO: -log sigmoid(beta * (policy log-ratio margin - reference margin)), on summed
    sequence log-probs. With `label_smoothing` = eps (the assumed share of flipped labels) the
    loss is conservative DPO: (1 - eps) of it plus eps of the loss with the pair swapped.
    Rewards are beta * (policy - reference) log-probs."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return _pairwise(beta * chosen_ratio, beta * rejected_ratio, losses)


def ipo_loss(
    policy_chosen_mean: torch.Tensor,
    policy_rejected_mean: torch.Tensor,
    ref_chosen_mean: torch.Tensor,
    ref_rejected_mean: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """IPO: (log-ratio margin - 1 / (2 beta))^2, beta being the paper's tau. The log-probs are
    per-token means: summed ones make the squared loss grow with response length, so beta would
    mean something different per dataset (TRL normalises the same way, with the authors' word)."""
    chosen_ratio = policy_chosen_mean - ref_chosen_mean
    rejected_ratio = policy_rejected_mean - ref_rejected_mean
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return _pairwise(beta * chosen_ratio, beta * rejected_ratio, losses)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, switching form at -ln 2 where each one loses precision."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_mean: torch.Tensor,
    policy_rejected_mean: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """ORPO: NLL of the chosen response minus beta * log sigmoid(log odds ratio), where
    odds(y) = P(y) / (1 - P(y)) of the per-token mean log-prob (the paper's lambda is `beta`).
    No reference model: the NLL term keeps the policy close to the chosen answers. `chosen_nll`
    is the (scalar) SFT loss on the chosen responses. Rewards are beta * mean log-probs."""
    chosen, rejected = policy_chosen_mean.float(), policy_rejected_mean.float()
    # log odds(c) - log odds(r) = (log P(c) - log P(r)) - (log(1 - P(c)) - log(1 - P(r)))
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    out = _pairwise(beta * chosen, beta * rejected, chosen_nll - beta * ratio)
    out.metrics.update(nll_loss=float(chosen_nll.detach()), log_odds_ratio=float(log_odds.detach().mean()))
    return out


def simpo_loss(
    policy_chosen_mean: torch.Tensor,
    policy_rejected_mean: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO: -log sigmoid(beta * (mean log-prob chosen - rejected) - gamma). The reward is the
    length-normalised log-prob, so no reference model is needed and longer answers gain nothing
    by length; gamma is the target reward margin. Rewards are beta * mean log-probs."""
    chosen, rejected = beta * policy_chosen_mean, beta * policy_rejected_mean
    logits = chosen - rejected - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return _pairwise(chosen, rejected, losses)


def kto_kl(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: the batch mean of policy - reference log-probs of mismatched
    (prompt, completion) pairs, clamped at 0 and detached. The paper estimates KL(policy || ref)
    this way; no gradient flows through it (it only sets where the sigmoid saturates)."""
    return (policy_kl - ref_kl).mean().detach().clamp(min=0)


def kto_loss(
    policy: torch.Tensor,
    ref: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLoss:
    """KTO on unpaired rows: a desirable completion costs 1 - sigmoid(beta * (log-ratio - kl)),
    an undesirable one 1 - sigmoid(beta * (kl - log-ratio)), weighted by `desirable_weight` /
    `undesirable_weight` (to balance unequal counts: the paper keeps
    desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]); the loss
    is the mean over all rows. `desirable` is a bool per row, `kl` comes from `kto_kl`. The
    rewards returned are beta * log-ratio of the desirable rows (`chosen_rewards`) and of the
    undesirable ones (`rejected_rewards`); accuracy is not defined without pairs and left out."""
    desirable = desirable.bool()
    ratio = policy - ref
    chosen_losses = 1 - torch.sigmoid(beta * (ratio[desirable] - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - ratio[~desirable]))
    losses = torch.cat([desirable_weight * chosen_losses, undesirable_weight * rejected_losses])
    rewards = (beta * ratio).detach()
    chosen, rejected = rewards[desirable], rewards[~desirable]
    metrics = {"kl": float(kl)}
    if len(chosen):
        metrics["rewards/chosen"] = float(chosen.mean())
    if len(rejected):
        metrics["rewards/rejected"] = float(rejected.mean())
    if len(chosen) and len(rejected):
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return PreferenceLoss(losses.mean(), chosen, rejected, metrics)
