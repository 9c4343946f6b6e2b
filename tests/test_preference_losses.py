"""The preference losses of oikyo_ray/train/preference.py: each against a value worked out by hand
on a tiny batch, and DPO, IPO, KTO, ORPO and SimPO against TRL's own code for the same log-probs.

How TRL is called (trl 1.16): ORPO's `odds_ratio_loss`, CPO's `cpo_loss` (SimPO) and
`get_batch_logps` are methods that only read a few attributes, so they run on a stand-in `self`.
DPO and KTO compute their loss inside `_compute_loss(model, inputs)`; that runs unchanged with a
stand-in `self` (precomputed reference log-probs) and a stand-in model whose output carries the
per-token log-probs we choose. Nothing of TRL's formula is copied here.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from oikyo_ray.data.tokenize import IGNORE
from oikyo_ray.train import preference as P


def _ls(x: float) -> float:
    """log sigmoid(x)."""
    return -math.log1p(math.exp(-x))


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


T = torch.tensor


# ---- sequence log-probs ----------------------------------------------------------------------


def test_sequence_logps_sums_and_means_labelled_tokens_only():
    # vocab 2, logits [0, ln 3] everywhere: P(token 0) = 1/4, P(token 1) = 3/4
    logits = torch.zeros(2, 4, 2)
    logits[..., 1] = math.log(3)
    labels = T([[IGNORE, IGNORE, 1, 0], [IGNORE, 1, 1, IGNORE]])
    out = P.sequence_logps(logits, labels)
    row0 = math.log(3 / 4) + math.log(1 / 4)
    row1 = 2 * math.log(3 / 4)
    assert out.tokens.tolist() == [2, 2]
    assert out.sum.tolist() == pytest.approx([row0, row1], abs=1e-6)
    assert out.mean.tolist() == pytest.approx([row0 / 2, row1 / 2], abs=1e-6)


def test_sequence_logps_ignores_the_first_label_and_logits_past_the_end():
    # position t predicts t+1: label 0 is never predicted, the last logits predict nothing
    logits = torch.randn(1, 3, 5)
    a = P.sequence_logps(logits, T([[4, 2, 3]]))
    logits[0, 2] = 100.0
    b = P.sequence_logps(logits, T([[0, 2, 3]]))
    assert torch.allclose(a.sum, b.sum)


# ---- hand-computed values --------------------------------------------------------------------

PC, PR, RC, RR = T([-1.0, -4.0]), T([-3.0, -2.0]), T([-2.0, -3.0]), T([-2.0, -2.5])


def test_dpo_hand_value():
    out = P.dpo_loss(PC, PR, RC, RR, beta=0.1)
    # row 0: ratios +1, -1 -> logit 0.2; row 1: ratios -1, +0.5 -> logit -0.15
    want = (-_ls(0.2) - _ls(-0.15)) / 2
    assert float(out.loss) == pytest.approx(want, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.1])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.05])
    assert out.metrics["rewards/accuracy"] == 0.5
    assert out.metrics["rewards/margins"] == pytest.approx((0.2 - 0.15) / 2)


def test_dpo_label_smoothing_hand_value():
    out = P.dpo_loss(PC[:1], PR[:1], RC[:1], RR[:1], beta=0.1, label_smoothing=0.2)
    assert float(out.loss) == pytest.approx(-0.8 * _ls(0.2) - 0.2 * _ls(-0.2), abs=1e-6)


def test_ipo_hand_value():
    out = P.ipo_loss(PC, PR, RC, RR, beta=0.25)  # 1/(2 beta) = 2
    want = ((2 - 2) ** 2 + (-1.5 - 2) ** 2) / 2
    assert float(out.loss) == pytest.approx(want, abs=1e-6)


def test_orpo_hand_value():
    c, r, nll = math.log(0.5), math.log(0.2), T(1.5)
    out = P.orpo_loss(T([c]), T([r]), nll, beta=0.1)
    log_or = math.log((0.5 / 0.5) / (0.2 / 0.8))  # odds 1 vs 1/4
    assert float(out.loss) == pytest.approx(1.5 - 0.1 * _ls(log_or), abs=1e-6)
    assert out.metrics["log_odds_ratio"] == pytest.approx(log_or, abs=1e-6)
    assert out.metrics["rewards/accuracy"] == 1.0


def test_simpo_hand_value():
    out = P.simpo_loss(T([-0.5]), T([-1.0]), beta=2.0, gamma=0.5)
    assert float(out.loss) == pytest.approx(-_ls(2 * 0.5 - 0.5), abs=1e-6)


def test_kto_hand_value():
    policy, ref = T([-1.0, -2.0, -3.0]), T([-2.0, -2.0, -2.0])
    desirable = T([True, False, True])
    kl = P.kto_kl(T([-5.0, -6.0, -4.0]), T([-5.5, -6.0, -4.3]))  # mean of 0.5, 0, 0.3
    assert float(kl) == pytest.approx(0.8 / 3, abs=1e-6)
    out = P.kto_loss(policy, ref, desirable, kl, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    k = 0.8 / 3
    want = ((1 - _sig(0.5 * (1 - k))) + (1 - _sig(0.5 * (-1 - k))) + 2 * (1 - _sig(0.5 * (k - 0)))) / 3
    assert float(out.loss) == pytest.approx(want, abs=1e-6)
    assert out.metrics["rewards/chosen"] == pytest.approx(0.0)  # 0.5 and -0.5
    assert out.metrics["rewards/rejected"] == pytest.approx(0.0)


def test_kto_kl_is_clamped_at_zero_and_detached():
    p = T([-5.0], requires_grad=True)
    kl = P.kto_kl(p, T([-4.0]))
    assert float(kl) == 0.0 and not kl.requires_grad


def test_losses_push_the_right_way():
    """One gradient step on the policy log-probs raises the chosen and lowers the rejected."""
    for name, fn in {
        "dpo": lambda c, r: P.dpo_loss(c, r, RC, RR, beta=0.1),
        "ipo": lambda c, r: P.ipo_loss(c, r, RC, RR, beta=0.1),
        "simpo": lambda c, r: P.simpo_loss(c, r),
        "orpo": lambda c, r: P.orpo_loss(c, r, T(0.0)),
    }.items():
        c, r = PC.clone().requires_grad_(), PR.clone().requires_grad_()
        fn(c, r).loss.backward()
        assert (c.grad < 0).all() and (r.grad > 0).all(), name


# ---- TRL's code on the same log-probs --------------------------------------------------------

trl = pytest.importorskip("trl", reason="trl is in the test extra")
from trl import DPOTrainer, KTOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

TOL = 1e-5
ACCEL = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def _logps(n: int, seed: int) -> torch.Tensor:
    return -torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 20 - 0.5


def _fake_model(per_token: torch.Tensor):
    """A model stand-in: its output carries the per-token log-probs TRL reads (and the logged
    extras, zeros); `per_token` is (rows, seq - 1)."""
    zeros = torch.zeros_like(per_token)
    out = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    return lambda **kw: out


def _per_token(total: torch.Tensor, width: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token log-probs, completion mask): each row's total spread over its last tokens."""
    rows = len(total)
    per = torch.zeros(rows, width - 1, dtype=total.dtype)
    per[:, -2:] = (total / 2).unsqueeze(1)
    mask = torch.zeros(rows, width, dtype=torch.long)
    mask[:, -2:] = 1
    return per, mask


def _trl_self(**kw) -> SimpleNamespace:
    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=ACCEL,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        **kw,
    )


def _trl_dpo(pc, pr, rc, rr, loss_type: str, beta: float, label_smoothing: float = 0.0) -> float:
    per, mask = _per_token(torch.cat([pc, pr]))
    me = _trl_self(
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
    )
    inputs = {
        "input_ids": torch.ones_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    return float(DPOTrainer._compute_loss(me, _fake_model(per), inputs, False))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_equals_trl(beta):
    pc, pr, rc, rr = _logps(6, 1), _logps(6, 2), _logps(6, 3), _logps(6, 4)
    ours = float(P.dpo_loss(pc, pr, rc, rr, beta=beta).loss)
    assert ours == pytest.approx(_trl_dpo(pc, pr, rc, rr, "sigmoid", beta), abs=TOL)


def test_dpo_label_smoothing_equals_trl():
    # TRL 1.16's "sigmoid" loss dropped label smoothing; its "aot" loss keeps the conservative-DPO
    # formula and, on one pair, sorts nothing away: it is conservative DPO exactly
    for seed in range(4):
        pc, pr, rc, rr = (_logps(1, seed * 4 + k) for k in range(4))
        ours = float(P.dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.1).loss)
        assert ours == pytest.approx(_trl_dpo(pc, pr, rc, rr, "aot", 0.2, 0.1), abs=TOL)


def test_ipo_equals_trl():
    pc, pr, rc, rr = _logps(5, 5), _logps(5, 6), _logps(5, 7), _logps(5, 8)
    # TRL divides the summed log-ratios by the completion length (2 tokens in `_per_token`)
    ours = float(P.ipo_loss(pc / 2, pr / 2, rc / 2, rr / 2, beta=0.3).loss)
    assert ours == pytest.approx(_trl_dpo(pc, pr, rc, rr, "ipo", 0.3), abs=TOL)


def test_kto_equals_trl():
    n = 7
    policy, ref, kl_policy, kl_ref = _logps(n, 9), _logps(n, 10), _logps(n, 11), _logps(n, 12)
    kl_policy = kl_ref + 0.3 * torch.rand(n, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    desirable = T([True, False, True, True, False, False, True])
    per, mask = _per_token(policy)
    me = _trl_self(
        calculate_KL=True,
        loss_type="kto",
        beta=0.2,
        desirable_weight=1.0,
        undesirable_weight=1.33,
        _compute_kl_logps=lambda model, batch: kl_policy,
    )
    inputs = {
        "input_ids": torch.ones_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "label": desirable,
        "ref_logps": ref,
        "ref_KL_logps": kl_ref,
    }
    theirs = float(KTOTrainer._compute_loss(me, _fake_model(per), inputs, False))
    kl = P.kto_kl(kl_policy, kl_ref)
    ours = P.kto_loss(policy, ref, desirable, kl, beta=0.2, desirable_weight=1.0, undesirable_weight=1.33)
    assert float(ours.loss) == pytest.approx(theirs, abs=TOL)
    assert float(kl) == pytest.approx(me._metrics["train"]["kl"][-1], abs=TOL)
    assert ours.metrics["rewards/chosen"] == pytest.approx(me._metrics["train"]["rewards/chosen"][-1], abs=TOL)


def test_orpo_equals_trl():
    # mean log-probs of answers: in (-3, 0), with some above -ln 2 (log1mexp's other branch)
    pc = -torch.rand(8, generator=torch.Generator().manual_seed(14), dtype=torch.float64) * 3
    pr = -torch.rand(8, generator=torch.Generator().manual_seed(15), dtype=torch.float64) * 3
    nll = T(1.234, dtype=torch.float64)
    me = SimpleNamespace(beta=0.1, accelerator=ACCEL)
    losses, chosen_rewards, _, _, log_odds = ORPOTrainer.odds_ratio_loss(me, pc, pr)
    theirs = nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics: the full ORPO loss
    ours = P.orpo_loss(pc, pr, nll, beta=0.1)
    assert float(ours.loss) == pytest.approx(float(theirs), abs=TOL)
    assert ours.metrics["log_odds_ratio"] == pytest.approx(float(log_odds), abs=TOL)
    assert ours.chosen_rewards.tolist() == pytest.approx(chosen_rewards.tolist(), abs=TOL)


def test_simpo_equals_trl():
    pc, pr = _logps(6, 16) / 10, _logps(6, 17) / 10
    me = SimpleNamespace(
        beta=2.0, simpo_gamma=0.7, label_smoothing=0.0, loss_type="simpo", alpha=0.0, accelerator=ACCEL
    )
    losses, _, _ = CPOTrainer.cpo_loss(me, pc, pr)
    assert float(P.simpo_loss(pc, pr, beta=2.0, gamma=0.7).loss) == pytest.approx(float(losses.mean()), abs=TOL)


def test_sequence_logps_equals_trl():
    g = torch.Generator().manual_seed(18)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[:, :3] = IGNORE
    labels[2, 5:] = IGNORE
    out = P.sequence_logps(logits, labels)
    assert out.sum.tolist() == pytest.approx(ORPOTrainer.get_batch_logps(logits, labels).tolist(), abs=TOL)
    assert out.mean.tolist() == pytest.approx(ORPOTrainer.get_batch_logps(logits, labels, True).tolist(), abs=TOL)
