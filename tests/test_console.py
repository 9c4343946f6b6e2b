"""The CLI's output: known third-party noise lines are dropped, everything else (real warnings,
oikyo's own lines, other tools' progress bars) passes; the library switches are set."""

import io
import re
import subprocess
import sys

import pytest

from oikyo_ray.console import NOISE, FilteredStream, is_noise, progress

# lines as these libraries print them (captured from `oikyo demo` and `ray job submit` runs)
SEEN = [
    "[2026-12-02 07:25:24,599] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. "
    "If you have GPU or other accelerator, we were unable to detect it.",
    "2026-12-02 07:25:25,422\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for "
    "this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    "2026-12-02 07:25:34,080\tWARNING __init__.py:28 -- Progress bars disabled. To enable, set "
    "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "2026-12-02 07:25:41,362\tINFO streaming_executor.py:371 -- ✔️  Dataset dataset_0357a6zchSaylMXnA6lxeZ_0 "
    "execution finished in 7.29 seconds",
    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure "
    "you already `pip install kernels` and the kernels >= 0.11.1",
    "\x1b[33m(raylet)\x1b[0m Task ServeController.graceful_shutdown failed. There are infinite retries remaining, "
    "so the task will be retried. Error: The actor is dead because it was killed by `ray.kill`.",
    'INFO 2026-12-02 07:27:08,420 serve 16011 -- Started Serve in namespace "serve".',
    "INFO 2026-12-02 07:27:21,712 serve 16011 -- Application 'oikyo' is ready at http://127.0.0.1:8000/.",
    "\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node: fd59 with address: "
    "192.0.2.2, which is 4x the maximum expected startup concurrency (2). This could be a result of",
    "`pretrained` model kwarg is not of type `str`. Many other model arguments may be ignored. Please do not "
    "launch via accelerate or use `parallelize=True` if passing an existing model this way.",
    "Passed an already-initialized model through `pretrained`, assuming single-process call to evaluate() or "
    "custom distributed integration",
]
KEPT = [
    "[oikyo] train (Ray Train) done in 68.5s -> runs/x/adapter",
    "| loss | 6.5812 | 1.2005 | -5.3807 | pass (improvement >= 0) |",
    "",
    "oikyo: error: cannot load model from 'x'",
    "2026-12-02 07:25:34,080\tWARNING worker.py:12 -- Some real Ray warning about a failed task",
    "UserWarning: Dataset has 0 rows",
]


@pytest.mark.parametrize("line", SEEN, ids=range(len(SEEN)))
def test_known_noise_is_recognised(line):
    assert is_noise(line)


@pytest.mark.parametrize("line", KEPT, ids=range(len(KEPT)))
def test_other_lines_are_kept(line):
    assert not is_noise(line)


def test_every_noise_pattern_is_exercised():
    for pattern, who, why in NOISE:
        assert who and why
        assert any(re.search(pattern, re.sub(r"\x1b\[[0-9;]*m", "", line)) for line in SEEN), pattern


def test_stream_drops_whole_lines_and_passes_progress():
    out = io.StringIO()
    s = FilteredStream(out)
    s.write("[oikyo] data ...\n" + SEEN[0][:40])  # a noise line arriving in two writes
    assert out.getvalue() == "[oikyo] data ...\n"
    s.write(SEEN[0][40:] + "\nkept\n")
    assert out.getvalue() == "[oikyo] data ...\nkept\n"
    s.write("\rLoading  50%")  # another tool's bar redraws with \r: shown at once
    assert out.getvalue().endswith("\rLoading  50%")
    s.write("tail without newline")
    s.flush()
    assert out.getvalue().endswith("tail without newline")


def test_quiet_third_party_filters_known_warnings_only():
    code = (
        "import warnings, sys\n"
        "from oikyo_ray.console import quiet_third_party\n"
        "with quiet_third_party():\n"
        "    from ray.util.annotations import RayDeprecationWarning  # puts its own filter in front\n"
        "    warnings.warn('`ExecutionOptions.exclude_resources` is deprecated.', RayDeprecationWarning)\n"
        "    warnings.warn('`is_gradient_checkpointing` is deprecated and will be removed in v6.', FutureWarning)\n"
        "    warnings.warn('a real problem', UserWarning)\n"
        f"    print({SEEN[1]!r}); print('[oikyo] kept'); import os; print(os.environ['HF_HUB_DISABLE_PROGRESS_BARS'])\n"
        f"print({SEEN[1]!r})\n"
    )  # after the block the stream is the plain one again
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "a real problem" in r.stderr and "is_gradient_checkpointing" not in r.stderr
    assert "exclude_resources" not in r.stderr
    assert r.stdout.splitlines() == ["[oikyo] kept", "1", SEEN[1]]


def test_a_wrapper_held_after_the_block_writes_to_the_current_stream(monkeypatch):
    """In-process CLI runs (tests, notebooks): a logger that kept the wrapper (Ray's handler binds
    sys.stderr once) writes to whatever sys.stderr is later, not to a capture closed since."""
    from oikyo_ray.console import quiet_third_party

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    with quiet_third_party():
        held = sys.stderr
        assert isinstance(held, FilteredStream)
        held.write("during\n" + SEEN[1] + "\n")
    assert sys.stderr is first and first.getvalue() == "during\n"
    first.close()  # that test's capture ends
    later = io.StringIO()
    monkeypatch.setattr(sys, "stderr", later)
    held.write("after\n" + SEEN[1] + "\n")
    held.flush()
    assert later.getvalue() == "after\n" and not held.closed


def test_cli_main_restores_streams(capsys):
    from oikyo_ray.cli import main

    before = sys.stderr
    assert main(["config", "--fields"]) == 0
    assert sys.stderr is before and "data.paths" in capsys.readouterr().out


def test_progress_bar_counts_and_shows_postfix(capsys):
    with progress(10, "train") as bar:
        bar.update(3, loss=1.5)
        bar.moveto(7, loss=1.0)
        bar.moveto(5)  # a restarted worker repeats steps: the bar never goes back
    err = capsys.readouterr().err
    assert "train" in err and "7/10" in err and "loss=1" in err


def test_the_program_filters_what_is_printed_while_it_exits():
    """Ray prints raylet warnings and log flushes at interpreter exit, after `main` returned: the
    `oikyo` program (and jobs/*.py) keeps the filter on until the process ends."""
    code = (
        "import atexit, sys\n"
        "from oikyo_ray.cli import program\n"
        f"atexit.register(lambda: print({SEEN[-1]!r}, file=sys.stderr))\n"
        "atexit.register(lambda: print('[oikyo] real line at exit', file=sys.stderr))\n"
        "program(['config'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "PYTHON worker processes" not in r.stderr and "[oikyo] real line at exit" in r.stderr
