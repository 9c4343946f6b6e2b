"""Pairwise objectives in the explicit training loop, without Ray (train/objective.py): pair
batches, the adapter-disabled reference, and DPO + LoRA on dpo_en_demo raising held-out
preference accuracy over the base on the tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from oikyo_ray.config import load_config
from oikyo_ray.data.tokenize import IGNORE
from oikyo_ray.model.load import load_model
from oikyo_ray.model.methods import apply_method
from oikyo_ray.train import objective as O
from oikyo_ray.train.loop import LoopHooks, shuffled_batches, train_loop

PAIRS = {
    "prompt_ids": [[5, 6, 7], [8]],
    "chosen_ids": [[10, 11], [12, 13, 14]],
    "rejected_ids": [[20], [21, 22, 23, 24]],
}


def test_collate_pairs_puts_chosen_first_and_learns_responses_only():
    b = O.collate_pairs(PAIRS, pad_id=0)
    assert b["input_ids"].tolist() == [
        [5, 6, 7, 10, 11],
        [8, 12, 13, 14, 0],
        [5, 6, 7, 20, 0],
        [8, 21, 22, 23, 24],
    ]
    i = IGNORE
    assert b["labels"].tolist() == [[i, i, i, 10, 11], [i, 12, 13, 14, i], [i, i, i, 20, i], [i, 21, 22, 23, 24]]
    assert b["num_tokens"].tolist() == [5, 4, 4, 5] and b["attention_mask"].sum().item() == 18


def cfg_with(tmp: Path, *overrides: str):
    return load_config(None, [f"model.cache_dir={tmp}", "method.lora.r=8", *overrides])


def lora_model(cfg, tiny_model):
    torch.manual_seed(0)
    return apply_method(load_model(cfg.model, str(tiny_model)), cfg.method)


def test_dpo_starts_at_log2_and_its_reference_is_the_base(tiny_model, tmp_path):
    cfg = cfg_with(tmp_path, "method.objective=dpo", "train.lr=1e-2", "train.warmup_ratio=0")
    model, base = lora_model(cfg, tiny_model), load_model(cfg.model, str(tiny_model))
    batch = O.collate_pairs(PAIRS, pad_id=0)
    loss, pairs = O.step_loss(cfg.method)(model, batch)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6) and int(pairs) == 2  # fresh adapter = reference
    train_loop(model, lambda e: [batch] * 4, cfg.train, 4, LoopHooks(), step_loss=O.step_loss(cfg.method))
    ref = O.reference_logps(model, batch)
    with torch.no_grad():
        want = O.sequence_logps_of(base, batch)
    assert torch.allclose(ref.sum, want.sum, atol=1e-5)  # the adapter moved, the reference did not
    assert not torch.allclose(O.sequence_logps_of(model, batch).sum, want.sum, atol=1e-3)
    assert float(O.step_loss(cfg.method)(model, batch)[0]) < math.log(2)


@pytest.mark.parametrize("objective", ["ipo", "orpo", "simpo"])
def test_other_pairwise_objectives_train_the_adapter(objective, tiny_model, tmp_path):
    cfg = cfg_with(tmp_path, f"method.objective={objective}")
    model = lora_model(cfg, tiny_model)
    loss, _ = O.step_loss(cfg.method)(model, O.collate_pairs(PAIRS, pad_id=0))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert math.isfinite(float(loss)) and grads and any(g.abs().sum() > 0 for g in grads)


def test_sft_keeps_the_loops_own_loss_and_columns():
    method = load_config(None, []).method
    assert O.step_loss(method) is None and O.batch_collate(method) is None
    assert O.row_columns(method) == ["input_ids", "labels"]


KTO_ROWS = {**PAIRS, "rejected_ids": [[20], []], "desirable": [-1, 0]}  # a pair, then an undesirable row


def test_collate_kto_splits_pairs_and_rotates_completions_for_the_kl_term():
    b = O.collate_kto(KTO_ROWS, pad_id=0)
    assert b["desirable"].tolist() == [True, False, False]
    real = [[5, 6, 7, 10, 11], [5, 6, 7, 20, 0], [8, 12, 13, 14, 0]]
    mismatched = [[5, 6, 7, 12, 13, 14], [5, 6, 7, 10, 11], [8, 20]]  # each prompt, the previous completion
    got = [
        [t for t, m in zip(row, mask) if m] for row, mask in zip(b["input_ids"].tolist(), b["attention_mask"].tolist())
    ]
    assert got == [[t for t in r if t] for r in real] + mismatched
    assert b["num_tokens"].tolist() == [5, 4, 4]


def test_kto_starts_at_one_half_and_learns(tiny_model, tmp_path):
    cfg = cfg_with(tmp_path, "method.objective=kto", "train.lr=1e-2", "train.warmup_ratio=0")
    model, step = lora_model(cfg, tiny_model), O.step_loss(cfg.method)
    batch = O.collate_kto(KTO_ROWS, pad_id=0)
    loss, rows = step(model, batch)
    assert float(loss) == pytest.approx(0.5, abs=1e-6) and int(rows) == 3  # log-ratios 0, KL 0
    train_loop(model, lambda e: [batch] * 4, cfg.train, 4, LoopHooks(), step_loss=step)
    assert float(step(model, batch)[0]) < 0.5


@pytest.mark.slow
def test_dpo_lora_raises_held_out_preference_accuracy(shared_dir, tiny_model, tmp_path):
    from oikyo_ray.data.prepare import prepare
    from oikyo_ray.data.prepared import load_split_rows

    torch.set_num_threads(2)
    cfg = cfg_with(
        tmp_path,
        f"data.paths=[{shared_dir / 'datasets' / 'dpo_en_demo.json'}]",
        "data.cache=false",
        "data.max_length=384",
        "data.val_fraction=0.15",
        "data.test_fraction=0.15",
        "method.objective=dpo",
        "train.batch_size=8",
        "train.lr=5e-3",
        "train.warmup_ratio=0",
    )
    prepare(cfg, str(tiny_model), tmp_path / "data")
    pick = lambda r: {k: r[k] for k in O.PAIR_COLUMNS}
    train = [pick(r) for r in load_split_rows(tmp_path / "data", "train") if O.has_pair(r)]
    held = [pick(r) for s in ("val", "test") for r in load_split_rows(tmp_path / "data", s) if O.has_pair(r)]
    assert len(train) >= 80 and len(held) >= 30
    as_batch = lambda rows: {k: [r[k] for r in rows] for k in O.PAIR_COLUMNS}
    held_batches = [O.collate_pairs(as_batch(held[i : i + 16]), 0) for i in range(0, len(held), 16)]

    model = lora_model(cfg, tiny_model)
    before = O.preference_accuracy(model, held_batches)
    steps = 2 * (len(train) // 8)
    epochs = lambda e: (O.collate_pairs(b, 0) for b in shuffled_batches(train, 8, cfg.train.seed + e))
    losses: list[float] = []
    hooks = LoopHooks(report=lambda metrics, ckpt: losses.append(metrics["loss"]))
    train_loop(model, epochs, cfg.train, steps, hooks, step_loss=O.step_loss(cfg.method))
    after = O.preference_accuracy(model, held_batches)
    assert after > before + 0.05, (before, after, losses)
    assert losses[-1] < math.log(2)


class Stop(Exception):
    pass


def _dpo_run(tiny_model, tmp, steps, ckpt_dir=None, stop_at=None, resume=None):
    """A local DPO + LoRA run over 24 synthetic pairs (batch 4: 6 steps an epoch), checkpointing
    every 4 steps into `ckpt_dir`, stopped after step `stop_at`, or resumed from `resume`."""
    import contextlib

    from transformers import AutoTokenizer

    from oikyo_ray.train.checkpoint import load_weights, restore, write_checkpoint
    from oikyo_ray.train.engine import TorchEngine

    cfg = cfg_with(tmp, "method.objective=dpo", "method.lora.dropout=0.1", "train.batch_size=4")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 3e-3, "checkpoint_every": 4})})
    g = torch.Generator().manual_seed(7)
    ids = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()
    rows = [{"prompt_ids": ids(6), "chosen_ids": ids(5), "rejected_ids": ids(4)} for _ in range(24)]
    model = lora_model(cfg, tiny_model)
    if resume is not None:
        load_weights(model, resume, full=False)
    engine = TorchEngine(model, cfg.train, steps)
    state = restore(engine, resume) if resume is not None else None
    tok, reports = AutoTokenizer.from_pretrained(tiny_model), []

    def report(metrics, st):
        reports.append(dict(metrics))
        if st is not None and ckpt_dir is not None:
            sd, osd = engine.full_state()
            write_checkpoint(ckpt_dir / f"step{st.step}", model, sd, osd, st, tok)

    def on_step(st):
        if st.step == stop_at:
            raise Stop

    epochs = lambda e: (O.collate_pairs(b, 0) for b in shuffled_batches(rows, 4, cfg.train.seed + e))
    hooks = LoopHooks(report=report, on_step=on_step)
    with contextlib.suppress(Stop):
        train_loop(
            model, epochs, cfg.train, steps, hooks, engine=engine, state=state, step_loss=O.step_loss(cfg.method)
        )
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}, reports


def test_dpo_resumed_mid_epoch_ends_with_the_same_weights(tiny_model, tmp_path):
    ref, _ = _dpo_run(tiny_model, tmp_path, 10)
    _dpo_run(tiny_model, tmp_path, 10, ckpt_dir=tmp_path / "ck", stop_at=9)
    # step 8 is 2 of epoch 1's 6 steps: the resumed run skips that epoch's first 2 batches
    resumed, reports = _dpo_run(tiny_model, tmp_path, 10, resume=tmp_path / "ck" / "step8")
    assert reports[0]["resumed_from"] == 8 and reports[0]["epoch"] == 1
    for k, v in ref.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_a_shard_of_pairs_gives_the_same_batches_whatever_order_it_streams_in():
    from oikyo_ray.train.epochs import cached_epochs

    cfg = load_config(None, ["train.batch_size=2"]).train
    rows = [dict(zip(PAIRS, vals)) for vals in zip(*PAIRS.values())] * 2
    rows[2], rows[3] = {**rows[2], "rejected_ids": [20, 5]}, {**rows[3], "chosen_ids": [12]}  # 4 distinct pairs
    as_batch = lambda rs: [{k: [r[k] for r in rs] for k in PAIRS}]
    forward = cached_epochs(lambda: as_batch(rows), cfg, 0, lambda b: b, O.collate_pairs)
    backward = cached_epochs(lambda: as_batch(rows[::-1]), cfg, 0, lambda b: b, O.collate_pairs)
    for a, b in zip(forward(0), backward(0), strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and len(a["input_ids"]) == 4  # 2 pairs, 2 sequences each


def test_steps_count_the_pairs_that_fit(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from oikyo_ray.train.steps import objective_counts

    for split, prompts in (("train", [[1], [], [2], [3]]), ("val", [[4], []]), ("test", [])):
        (tmp_path / split).mkdir()
        if prompts:
            pq.write_table(pa.table({"prompt_ids": prompts}), tmp_path / split / "part-0.parquet")
    manifest = {"counts": {"train": 4, "val": 2, "test": 0, "accepted": 6}}
    dpo = objective_counts(cfg_with(tmp_path, "method.objective=dpo"), manifest, tmp_path)
    assert dpo["counts"] == {"train": 3, "val": 1, "test": 0, "accepted": 6}  # no-room rows have empty ids
    assert objective_counts(cfg_with(tmp_path), manifest, tmp_path) is manifest
