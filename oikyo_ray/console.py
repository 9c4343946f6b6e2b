"""What the `oikyo` CLI prints: its own lines and real warnings, without known third-party noise,
and progress bars for long steps (Ray-free).

    install()                    once, first thing in the `oikyo` program (before ray/torch are imported)
    with quiet_third_party():    the same around an in-process CLI call
    with progress(total, "train") as bar: bar.update(n, loss=...)

Noise is removed with the switches the libraries offer where they offer one (environment
variables, `warnings` filters); lines that Ray's, DeepSpeed's, bitsandbytes' and lm-eval's loggers, and
Ray's raylet log stream, print with no switch to turn them off are dropped by exact pattern
(`NOISE`, each with the reason it is noise). Anything not listed is printed as before, so a new
warning is never hidden. `oikyo --verbose` prints everything.
"""

from __future__ import annotations

import io
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial

from tqdm.auto import tqdm

# (pattern, who prints it, why it is noise for an oikyo user)
NOISE: tuple[tuple[str, str, str], ...] = (
    (
        r"Setting accelerator to CPU\. If you have GPU or other accelerator",
        "deepspeed",
        "a CPU-only machine is expected to have no accelerator",
    ),
    (
        r"Token authentication is enabled for this Ray cluster\. Set RAY_AUTH_MODE=disabled",
        "ray",
        "oikyo turns token auth on deliberately (safe by default)",
    ),
    (
        r"Progress bars disabled\. To enable, set `ray\.data\.DataContext",
        "ray.data",
        "oikyo turns Ray Data's per-operator bars off and times each stage itself",
    ),
    (r"Dataset \S+ execution finished in [\d.]+ seconds", "ray.data", "oikyo prints each stage's duration"),
    (
        r"Failed to load CPU gemm_4bit_forward from kernels-community",
        "bitsandbytes",
        "an optional faster CPU kernel (the `kernels` package); qlora works without it",
    ),
    (
        r"Task ServeController\.graceful_shutdown failed\. There are infinite retries remaining",
        "ray (raylet)",
        "serve.shutdown() kills the controller while its own shutdown task is in flight",
    ),
    (
        r"serve \d+ -- (Started Serve in namespace|Connecting to existing Serve app in namespace"
        r"|Application '[^']*' is ready at)",
        "ray.serve",
        "oikyo prints the URL it serves on",
    ),
    (
        r"PYTHON worker processes have been started on node: \S+ with address: \S+, which is \d+x the "
        r"maximum expected startup concurrency",
        "ray (raylet)",
        "fractional-CPU Ray Data and Train workers on a small machine start together",
    ),
    (
        r"`pretrained` model kwarg is not of type `str`\. Many other model arguments may be ignored"
        r"|Passed an already-initialized model through `pretrained`, assuming single-process call",
        "lm_eval",
        "eval.lm_eval_tasks hands lm-eval the models oikyo loaded itself, on purpose",
    ),
)
# (category, message regex, why): warnings whose source is a third-party library's own call
WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (
        FutureWarning,
        r"`is_gradient_checkpointing` is deprecated",
        "transformers calls its own deprecated property while loading peft models",
    ),
    (Warning, r"`ExecutionOptions\.exclude_resources` is deprecated", "Ray Train sets it on Ray Data itself"),
)
_NOISE_RE = re.compile("|".join(f"(?:{p})" for p, _, _ in NOISE))
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def is_noise(line: str) -> bool:
    return bool(_NOISE_RE.search(_ANSI.sub("", line)))


class FilteredStream(io.TextIOBase):
    """A text stream that drops whole lines matching `NOISE` and passes everything else on.

    Lines are held until their newline; a carriage return (another tool's progress bar redrawing)
    is passed straight through, so bars still animate.

    `release(name)` turns a wrapper that has been taken off `sys.<name>` into one that writes to
    whatever `sys.<name>` is at each write: loggers keep the stream they found at set-up (Ray's
    handler binds `sys.stderr` once), so a wrapper can outlive the block it was installed for."""

    def __init__(self, stream):
        self._stream, self._follow, self._buf = stream, "", ""

    @property
    def stream(self):
        if not self._follow:
            return self._stream
        current = getattr(sys, self._follow)
        return current if current is not self else getattr(sys, f"__{self._follow}__")

    def release(self, name: str) -> None:
        self.flush_quietly()
        self._follow = name

    def flush_quietly(self) -> None:
        with suppress(ValueError):  # the wrapped stream was closed under us
            self.flush()

    def write(self, s: str) -> int:
        self._buf += s
        *lines, self._buf = self._buf.split("\n")
        out = "".join(line + "\n" for line in lines if not is_noise(line))
        if "\r" in self._buf:
            out, self._buf = out + self._buf, ""
        if out:
            self.stream.write(out)
        return len(s)

    def flush(self) -> None:
        if self._buf and not is_noise(self._buf):
            self.stream.write(self._buf)
        self._buf = ""
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def closed(self) -> bool:  # the wrapped stream's: a library holding this wrapper checks before writing
        return self.stream.closed

    @property
    def encoding(self):
        return self.stream.encoding


def _show_unless_known(show, message, category, filename, lineno, file=None, line=None) -> None:
    if not any(issubclass(category, c) and re.match(m, str(message)) for c, m, _ in WARNINGS):
        show(message, category, filename, lineno, file, line)


def install() -> Callable[[], None]:
    """Set the libraries' own switches and filter stdout and stderr; returns what undoes it. Call
    it before ray, torch or transformers are imported: some loggers bind their stream at import.
    A program calls it once and never undoes it (`cli.program`): Ray prints lines while the
    process shuts down, after the CLI's work is done."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' load/save bars
    for category, message, _ in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    # Filters alone do not hold: ray inserts its own RayDeprecationWarning filter in front of ours
    # when it is imported. The display hook (documented as replaceable) drops the known ones.
    shown = warnings.showwarning
    warnings.showwarning = partial(_show_unless_known, shown)
    saved = {name: getattr(sys, name) for name in ("stdout", "stderr")}
    installed = {}
    for name, stream in saved.items():
        if not isinstance(stream, FilteredStream):  # a nested call keeps the outer filter
            installed[name] = FilteredStream(stream)
            setattr(sys, name, installed[name])

    def undo() -> None:
        warnings.showwarning = shown
        for name, stream in saved.items():
            setattr(sys, name, stream)
        for name, wrapper in installed.items():
            wrapper.release(name)

    return undo


@contextmanager
def quiet_third_party() -> Iterator[None]:
    """`install` for the duration of a block (the CLI called in-process: tests, notebooks).

    The streams are put back on exit, and a wrapper a library still holds then writes to the
    current `sys.stdout`/`sys.stderr`: a wrapper stuck on the stream it first wrapped (a test's
    capture, closed since) would break every later write, such as a Ray Data thread logging its
    shutdown."""
    undo = install()
    try:
        yield
    finally:
        undo()


class _Bar:
    def __init__(self, bar: tqdm):
        self._bar, self._postfix = bar, dict[str, object]()

    def update(self, n: int = 1, **postfix) -> None:
        """Advance by `n`; `postfix` values are shown after the rate, each kept until replaced."""
        if postfix:
            self._postfix.update(postfix)
            self._bar.set_postfix(self._postfix, refresh=n == 0)
        if n:
            self._bar.update(n)

    def moveto(self, done: int, **postfix) -> None:
        """Set the count to `done` (a resumed run starts past zero; a restarted worker repeats
        steps: the count never goes back)."""
        self.update(max(0, done - self._bar.n), **postfix)


@contextmanager
def progress(total: int | None, desc: str, unit: str = "step") -> Iterator[_Bar]:
    """A tqdm bar (rate and ETA included) on the real stderr, so the noise filter never holds it;
    redrawn at most every 30 s where stderr is a log file rather than a terminal."""
    stream = sys.stderr.stream if isinstance(sys.stderr, FilteredStream) else sys.stderr
    tty = stream.isatty()
    bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=stream,
        dynamic_ncols=tty,
        leave=True,
        mininterval=0.2 if tty else 30.0,
        ascii=not tty,
    )
    try:
        yield _Bar(bar)
    finally:
        bar.close()
