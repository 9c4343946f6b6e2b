"""The run's monitoring files (Ray-free): TensorBoard scalars, the loss plot, and the driver
following metrics.jsonl for its progress bar."""

import json
import time

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from oikyo_ray.console import progress
from oikyo_ray.train.monitor import TensorBoardLog, following, plot_losses, read_metrics


def _append(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def test_following_sees_appended_lines_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _append(path, {"step": 5, "loss": 2.0})  # a resumed run's old lines are not shown again
    seen = []
    with following(path, seen.append, poll_s=0.05):
        _append(path, {"step": 10, "loss": 1.5})
        with open(path, "a") as f:
            f.write('{"step": 20, ')  # a line the controller is still writing
        time.sleep(0.2)
        assert seen == [{"step": 10, "loss": 1.5}]
        with open(path, "a") as f:
            f.write('"loss": 1.0}\n')
    assert seen == [{"step": 10, "loss": 1.5}, {"step": 20, "loss": 1.0}]  # read once more at the end


def test_following_a_file_not_there_yet_and_a_failing_callback(tmp_path):
    path = tmp_path / "later.jsonl"
    seen = []

    def on_row(m):
        seen.append(m)
        raise RuntimeError("a display bug")  # must not end the follower or the run

    with following(path, on_row, poll_s=0.05):
        time.sleep(0.1)
        _append(path, {"step": 1})
        _append(path, {"step": 2})
    assert seen == [{"step": 1}, {"step": 2}]


def test_training_bar_from_metrics_lines(tmp_path, capsys):
    from oikyo_ray.train.ray_train import _show_step

    path = tmp_path / "metrics.jsonl"
    with progress(30, "train") as bar, following(path, lambda m: _show_step(bar, m), poll_s=0.05):
        for step in (10, 20, 30):
            _append(path, {"step": step, "loss": 3.0 / step, "tokens_per_s": 1.0})
        _append(path, {"step": 30, "val_loss": 0.25})
    err = capsys.readouterr().err
    assert "30/30" in err and "val_loss=0.2500" in err and "100%" in err


def test_tensorboard_and_plot(tmp_path):
    rows = [{"step": 1, "loss": 2.0, "time": 1.0}, {"step": 2, "loss": 1.0, "val_loss": 1.5, "flag": True}]
    tb = TensorBoardLog(tmp_path / "tb")
    for r in rows:
        tb.write(r)
        _append(tmp_path / "metrics.jsonl", r)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "val/loss"}  # no time, no booleans
    assert [e.value for e in acc.Scalars("train/loss")] == [2.0, 1.0]
    assert read_metrics(tmp_path / "metrics.jsonl") == rows
    assert plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png").stat().st_size > 1000
    assert plot_losses(tmp_path / "none.jsonl", tmp_path / "x.png") is None
