"""The terminal side of the command-line tools: progress (a redrawn bar when
stderr is a TTY, otherwise a quiet line every 25 % so logs stay readable) and
the one-line error report every command ends with."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time
from collections.abc import Callable
from typing import TextIO

from ota_common.text import ERROR_LIMIT, clean


class Progress:
    def __init__(self, label: str, stream: TextIO | None = None, *, unit: str = "MiB") -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.unit = unit
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._last_quarter = -1

    def __call__(self, done: int, total: int) -> None:
        if total <= 0:
            return
        frac = min(done / total, 1.0)
        if self.tty:
            now = time.monotonic()
            if now - self._last_draw < 0.1 and done < total:
                return
            self._last_draw = now
            width = 30
            filled = int(frac * width)
            bar = "#" * filled + "-" * (width - filled)
            rate = done / max(now - self.start, 1e-6) / (1 << 20)
            left = (total - done) / (rate * (1 << 20)) if rate > 0 and done < total else None
            eta = f" ETA {int(left) // 60}:{int(left) % 60:02d}" if left is not None and left < 360000 else ""
            self.stream.write(
                f"\r{self.label} [{bar}] {frac * 100:5.1f}% {done / (1 << 20):8.1f}/{total / (1 << 20):.1f} MiB"
                f" {rate:6.1f} MiB/s{eta}\x1b[K"
            )
            if done >= total:
                self.stream.write("\n")
                self._last_draw = 0.0
            self.stream.flush()
        else:
            quarter = int(frac * 4)
            if quarter > self._last_quarter and quarter >= 1:
                # every quarter crossed gets its line, however far one update jumped (ops finish
                # in parallel, a daemon relays progress at its own pace): the same run prints the same lines
                for q in range(max(self._last_quarter + 1, 1), quarter + 1):
                    self.stream.write(f"{self.label}: {q * 25}%\n")
                self._last_quarter = quarter
                self.stream.flush()

    def finish(self) -> None:
        if self.tty and self._last_draw:
            self.stream.write("\n")
            self.stream.flush()


def version_string(prog: str) -> str:
    """`PROG VERSION` for `--version`, from the installed package's metadata."""
    try:
        version = importlib.metadata.version("edge-ota")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown (not installed as a package)"
    return f"{prog} {version}"


def run_reporting_errors(
    prog: str,
    command: Callable[[], int],
    *,
    expected: tuple[type[Exception], ...],
    verbose: bool,
    json_errors: bool = False,
) -> int:
    """Run a CLI command; an expected error becomes one `PROG: error: ...` line on
    stderr and exit status 1 (a traceback only when `verbose`). With `json_errors`
    the line is one JSON object instead: {"error": {"type": ..., "message": ...}}."""
    try:
        return command()
    except expected as e:
        if verbose:
            raise
        _report(prog, getattr(e, "kind", type(e).__name__), str(e), json_errors)
    except OSError as e:
        if verbose:
            raise
        _report(prog, type(e).__name__, f"{e.filename or ''}: {e.strerror}", json_errors)
    return 1


def _report(prog: str, kind: str, message: str, as_json: bool) -> None:
    message = clean(message, ERROR_LIMIT)
    if as_json:
        print(json.dumps({"error": {"type": kind, "message": message}, "program": prog}), file=sys.stderr)
    else:
        print(f"{prog}: error: {message}", file=sys.stderr)
