"""Sample packing: block layout, isolation between packed samples, and the data stage's packed split."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from oikyo_ray.config import load_config
from oikyo_ray.data.packing import efficiency, pack_rows, padded_efficiency, plan_blocks
from oikyo_ray.data.tokenize import IGNORE
from oikyo_ray.train.loop import collate, loss_on


def test_best_fit_decreasing_fills_blocks_and_keeps_every_row():
    lengths = [7, 3, 5, 1, 4, 2, 6, 8]
    blocks = plan_blocks(lengths, 8)
    assert sorted(i for b in blocks for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8 for b in blocks)
    assert len(blocks) == 5  # 36 tokens: 8 | 7+1 | 6+2 | 5+3 | 4 is what best-fit decreasing gives
    with pytest.raises(ValueError, match="does not fit"):
        plan_blocks([9], 8)


def test_pack_rows_layout_positions_labels_and_padding():
    ids = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    labels = [[IGNORE, 12, 13], [21, 22], [IGNORE, IGNORE, 33, 34]]
    out = pack_rows(ids, labels, length=6, pad_id=0)
    assert len(out["input_ids"]) == 2 and all(len(x) == 6 for x in out["input_ids"])
    assert out["num_tokens"] == [6, 3]
    first = [list(x) for x in (out["input_ids"][0], out["labels"][0], out["position_ids"][0])]
    # the longest row first, then the best fit (2 tokens), then padding as one more sequence
    assert first[0] == [31, 32, 33, 34, 21, 22]
    assert first[2] == [0, 1, 2, 3, 0, 1]
    assert first[1] == [IGNORE, IGNORE, 33, 34, IGNORE, 22]  # a sample's first label is never learned
    second = [list(x) for x in (out["input_ids"][1], out["labels"][1], out["position_ids"][1])]
    assert second == [[11, 12, 13, 0, 0, 0], [IGNORE, 12, 13, IGNORE, IGNORE, IGNORE], [0, 1, 2, 0, 1, 2]]
    assert efficiency(out["num_tokens"], 6) == pytest.approx(9 / 12)
    assert padded_efficiency([3, 2, 4], batch_size=2) == pytest.approx(9 / (6 + 4))


def test_packed_samples_do_not_attend_to_each_other(tiny_model):
    """The loss of a packed block equals the losses of its samples run alone (sdpa on CPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rng = np.random.default_rng(0)
    rows = [rng.integers(5, 300, size=n).tolist() for n in (9, 14, 6)]
    packed = pack_rows(rows, rows, length=32, pad_id=0)
    assert len(packed["input_ids"]) == 1
    batch = collate({k: packed[k] for k in packed}, pad_id=0)
    assert "attention_mask" not in batch and int(batch["num_tokens"].sum()) == 29
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        at = 0
        for r in sorted(rows, key=len, reverse=True):
            alone = model(input_ids=torch.tensor([r])).logits[0]
            torch.testing.assert_close(logits[at : at + len(r)], alone, rtol=1e-4, atol=1e-4)
            at += len(r)
        # the same block without position ids leaks across samples: the check above can fail
        leaky = model(input_ids=batch["input_ids"]).logits[0]
        assert not torch.allclose(leaky[14:23], logits[14:23], atol=1e-3)
        # token-weighted loss of the block == token-weighted loss of the rows padded one by one
        loss, n = loss_on(model, batch)
        unpacked = collate({"input_ids": rows, "labels": [[IGNORE] + r[1:] for r in rows]}, pad_id=0)
        ref, m = loss_on(model, unpacked)
    assert n == m == 26
    assert float(loss) == pytest.approx(float(ref), rel=1e-4)


def test_prepare_writes_a_packed_train_split(tiny_model, tmp_path):
    from oikyo_ray.data.prepare import prepare as prepare_local

    cfg = load_config(
        None,
        [f"model.cache_dir={tmp_path / 'cache'}", "data.packing=true", "data.max_length=128", "data.pack_length=256"],
    )
    manifest = prepare_local(cfg, str(tiny_model), tmp_path / "out")
    p = manifest["packing"]
    blocks = pq.read_table(tmp_path / "out" / "train_packed").to_pylist()
    rows = pq.read_table(tmp_path / "out" / "train").to_pylist()
    assert p["blocks"] == len(blocks) and p["rows"] == len(rows) == manifest["counts"]["train"]
    assert all(len(b["input_ids"]) == len(b["position_ids"]) == 256 for b in blocks)
    assert sum(b["num_tokens"] for b in blocks) == sum(r["num_tokens"] for r in rows)  # no token lost
    # every row's tokens appear, whole, in some block
    starts = {tuple(b["input_ids"][i : i + 8]) for b in blocks for i, pos in enumerate(b["position_ids"]) if pos == 0}
    assert all(tuple(r["input_ids"][:8]) in starts for r in rows)
    assert p["efficiency"] > p["padded_efficiency"] and p["efficiency"] > 0.9
    assert "train_packed/" in json.dumps(manifest["outputs"])
    # a second run is served from the cache, packed split included
    again = prepare_local(cfg, str(tiny_model), tmp_path / "out2")
    assert again["cache"]["hit"] and again["packing"] == p
    assert pq.read_table(tmp_path / "out2" / "train_packed").num_rows == len(blocks)


def test_pack_length_shorter_than_max_length_is_refused():
    from oikyo_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="pack_length"):
        load_config(None, ["data.max_length=128", "data.pack_length=64"])
