"""k-fold cross-validation: folds cut by prompt out of train + val with test untouched, mean ± std
by hand, bad settings refused before Ray, and `oikyo cv` end to end on a real local Ray."""

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oikyo_ray.cli import main
from oikyo_ray.config import load_config
from oikyo_ray.cv.folds import fold_of, markdown, summarise, write_folds
from oikyo_ray.demo.run import DEMO_CONFIG
from oikyo_ray.errors import ConfigError, DataError
from tests.conftest import SHORT_DEMO_RUN


def _conv(prompt: str, answer: str) -> str:
    return json.dumps([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])


def _prepared(root: Path, train: list[str], val: list[str], test: list[str]) -> Path:
    """A prepared dataset's layout: split parquet dirs and a manifest with counts."""
    for split, convs in (("train", train), ("val", val), ("test", test)):
        (root / split).mkdir(parents=True)
        if convs:
            table = pa.table({"hash": [f"{split}{i}" for i in range(len(convs))], "messages": convs})
            pq.write_table(table, root / split / "part-0.parquet")
    counts = {"train": len(train), "val": len(val), "test": len(test)}
    (root / "manifest.json").write_text(json.dumps({"counts": counts, "content_hash": "x"}))
    return root


def _messages(run: Path, split: str) -> list[str]:
    return pq.read_table(run / "data" / split).column("messages").to_pylist()


def test_folds_cover_train_and_val_once_keep_prompts_together_and_test_untouched(tmp_path):
    train = [_conv(f"q{i}", f"a{i}") for i in range(30)] + [_conv("q0", "another answer to q0")]
    val = [_conv(f"v{i}", "b") for i in range(6)]
    test = [_conv("t0", "c"), _conv("t1", "d")]
    data = _prepared(tmp_path / "data", train, val, test)
    folds = write_folds(data, tmp_path / "cv", 3, "salt")
    assert [run.name for run, _ in folds] == ["fold-0", "fold-1", "fold-2"]
    held_out = [set(_messages(run, "val")) for run, _ in folds]
    assert sum(len(v) for v in held_out) == len(train) + len(val)  # every row validated exactly once
    assert set().union(*held_out) == set(train + val)
    for (run, manifest), mine in zip(folds, held_out):
        rest = set(_messages(run, "train"))
        assert not rest & mine and rest | mine == set(train + val)
        assert _messages(run, "test") == test  # the same test rows in every fold
        assert manifest["counts"] == {"train": len(rest), "val": len(mine), "test": 2}
        assert json.loads((run / "data" / "manifest.json").read_text())["cv"]["folds"] == 3
    # both answers to q0 sit in one fold: no fold validates on a prompt it trains on
    (fold,) = {i for i, v in enumerate(held_out) if _conv("q0", "a0") in v}
    assert _conv("q0", "another answer to q0") in held_out[fold]
    assert fold_of(_conv("q0", "x"), 3, "salt") == fold_of(_conv("q0", "y"), 3, "salt")
    assert write_folds(data, tmp_path / "cv", 3, "salt")[0][1] == folds[0][1]  # rewritten alike


def test_too_many_folds_for_the_rows_is_refused(tmp_path):
    data = _prepared(tmp_path / "data", [_conv("only", "one")], [_conv("and", "two")], [])
    with pytest.raises(DataError, match=r"cv.folds=5: fold \d gets no rows of the 2"):
        write_folds(data, tmp_path / "cv", 5, "salt")


def test_mean_and_std_by_hand():
    summary = summarise(
        [{"loss": 1.0, "f1": 0.5, "only_here": 1.0}, {"loss": 2.0, "f1": 0.7}, {"loss": 3.0, "f1": 0.9}]
    )
    assert set(summary) == {"loss", "f1"}  # a metric not every fold has is left out
    assert summary["loss"]["mean"] == 2.0 and summary["loss"]["std"] == 1.0  # sample std (n - 1)
    assert math.isclose(summary["f1"]["std"], 0.2) and summary["f1"]["values"] == [0.5, 0.7, 0.9]
    assert "| loss | 2 ± 1 | 1, 2, 3 |" in markdown(summary, 3)


def test_bad_cv_settings_fail_before_ray(capsys):
    with pytest.raises(ConfigError, match=r"cv\.folds"):
        load_config(DEMO_CONFIG, ["cv.folds=1"])
    assert main(["cv", str(DEMO_CONFIG), "data.packing=true"]) == 2
    err = capsys.readouterr().err
    assert "data.packing" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.ray
def test_oikyo_cv_trains_each_fold_and_reports_mean_and_std(ray_session, base_overrides, tmp_path):
    args = [
        "cv",
        str(DEMO_CONFIG),
        *base_overrides,
        "run.name=cv",
        "cv.folds=2",
        *SHORT_DEMO_RUN,
    ]
    assert main(args) == 0
    cv_dir = tmp_path / "runs" / "cv"
    result = json.loads((cv_dir / "cv.json").read_text())
    assert result["folds"] == 2 and len(result["per_fold"]) == 2
    for name in ("best_val_loss", "test_loss", "test_exact_match"):
        s = result["summary"][name]
        assert len(s["values"]) == 2 and s["mean"] == pytest.approx(sum(s["values"]) / 2)
        assert s["std"] == pytest.approx(abs(s["values"][0] - s["values"][1]) / math.sqrt(2))
    assert result["summary"]["best_val_loss"]["values"][0] != result["summary"]["best_val_loss"]["values"][1]
    folds = [cv_dir / "fold-0", cv_dir / "fold-1"]
    vals = [set(_messages(f, "val")) for f in folds]
    pooled = set(_messages(cv_dir, "train")) | set(_messages(cv_dir, "val"))
    assert not vals[0] & vals[1] and vals[0] | vals[1] == pooled
    for f in folds:
        assert (f / "adapter" / "adapter_model.safetensors").is_file() and (f / "eval" / "report.json").is_file()
        assert _messages(f, "test") == _messages(cv_dir, "test")
    assert "best_val_loss" in (cv_dir / "cv.md").read_text()
