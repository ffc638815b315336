"""What the client commands share: exit codes, and the progress display of a running batch.

Scripts branch on exit codes, so they are fixed here and documented in ``docs/cli.md``. The
progress display has two faces: a live rich bar on a terminal, and plain lines every few
seconds when stdout is a pipe or a file (CI logs, ``nohup``), because cursor tricks there
only make noise. Both end with the same one-line summary.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# Plain-line cadence without a terminal; an environment variable so that logs of long runs
# can be thinned out (and tests need not wait).
PLAIN_EVERY_ENV = "BATCHD_PROGRESS_INTERVAL"


class ExitCode(IntEnum):
    OK = 0
    LINES_FAILED = 1  # finished, but some lines failed, or the batch expired or was cancelled
    USAGE = 2  # bad arguments, or the input file failed validation
    UNREACHABLE = 3  # the server or the upstream could not be reached
    INTERRUPTED = 130  # Ctrl-C: detached (submit) or stopped to be resumed (run)


def outcome(status: str, failed: int) -> ExitCode:
    """The exit code of a batch that reached ``status``."""
    if status == "completed":
        return ExitCode.LINES_FAILED if failed else ExitCode.OK
    if status == "failed":
        return ExitCode.USAGE
    return ExitCode.LINES_FAILED


class CliExit(Exception):
    """Stop the command with this exit code after printing ``message`` to stderr."""

    def __init__(self, code: ExitCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def check_input(path: Path) -> None:
    if not path.is_file():
        raise CliExit(ExitCode.USAGE, f"{path} is not a file")


def detect_endpoint(path: Path) -> str:
    """The ``url`` of the file's first request line: every line must share it anyway."""
    try:
        with path.open("rb") as f:
            first = next((line for line in f if line.strip()), b"")
        url = json.loads(first).get("url") if first else None
    except (OSError, ValueError, AttributeError) as exc:
        raise CliExit(ExitCode.USAGE, f"cannot read the endpoint from {path}'s first line ({exc})") from exc
    if not isinstance(url, str) or not url.startswith("/"):
        raise CliExit(
            ExitCode.USAGE,
            f"{path}'s first line has no usable url ({url!r}); pass --endpoint, e.g. /v1/chat/completions",
        )
    return str(url)


@dataclass(frozen=True)
class Snapshot:
    """What the display needs from a batch, whether it came from the API or the store."""

    batch_id: str
    status: str
    completed: int
    failed: int
    total: int

    @property
    def done(self) -> int:
        return self.completed + self.failed


class RateMeter:
    """Lines per second over the last ``window`` seconds: recent enough to show a stall,
    long enough not to jump with every checkpoint."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()
        self.first: tuple[float, int] | None = None

    def add(self, done: int, now: float) -> None:
        if self.first is None:
            self.first = (now, done)
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def overall(self, now: float) -> tuple[float, float]:
        """(seconds since the first sample, lines/s over them) for the summary."""
        if self.first is None or not self.samples:
            return 0.0, 0.0
        elapsed = now - self.first[0]
        done = self.samples[-1][1] - self.first[1]
        return elapsed, (done / elapsed if elapsed > 0 else 0.0)


def eta(snap: Snapshot, rate: float) -> str:
    if rate <= 0 or not snap.total:
        return "-:--"
    seconds = int((snap.total - snap.done) / rate)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def plain_line(snap: Snapshot, rate: float) -> str:
    return (
        f"{snap.batch_id}: {snap.status} {snap.done}/{snap.total} done, "
        f"{snap.failed} failed, {rate:.0f} lines/s"
    )


def summary_line(snap: Snapshot, elapsed: float, rate: float) -> str:
    return (
        f"{snap.batch_id} {snap.status}: {snap.completed}/{snap.total} succeeded, "
        f"{snap.failed} failed, in {elapsed:.1f}s ({rate:.0f} lines/s)"
    )


class ProgressView:
    """Show a batch's progress; call ``update`` with every poll, ``finish`` at the end."""

    def __init__(self, console: Console, plain_every: float | None = None):
        self.console = console
        self.live = console.is_terminal and not console.is_dumb_terminal
        self.plain_every = plain_every if plain_every is not None else _plain_every()
        self.meter = RateMeter()
        self._last_plain: tuple[float, str] | None = None
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> ProgressView:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                TextColumn("{task.fields[status]}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.fields[shown_total]} done"),
                TextColumn("{task.fields[failed]} failed"),
                TextColumn("{task.fields[rate]:.0f} lines/s"),
                TextColumn("ETA {task.fields[eta]}"),
                console=self.console,
                refresh_per_second=4,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def update(self, snap: Snapshot) -> None:
        now = time.monotonic()
        self.meter.add(snap.done, now)
        rate = self.meter.rate()
        if self._progress is not None:
            self._update_live(self._progress, snap, rate)
        else:
            self._update_plain(snap, rate, now)

    def finish(self, snap: Snapshot) -> None:
        """Stop the live display and print the summary line (both faces print it)."""
        now = time.monotonic()
        self.meter.add(snap.done, now)
        if self._progress is not None:
            self._update_live(self._progress, snap, self.meter.rate())
        self.__exit__(None)
        elapsed, rate = self.meter.overall(now)
        self.console.print(summary_line(snap, elapsed, rate), markup=False, highlight=False, soft_wrap=True)

    def _update_live(self, progress: Progress, snap: Snapshot, rate: float) -> None:
        fields: dict[str, Any] = {
            "status": snap.status,
            "failed": snap.failed,
            "rate": rate,
            "eta": eta(snap, rate),
            "shown_total": snap.total or "?",
        }
        if self._task is None:
            self._task = progress.add_task(snap.batch_id, total=snap.total or None, **fields)
        progress.update(self._task, completed=snap.done, total=snap.total or None, **fields)

    def _update_plain(self, snap: Snapshot, rate: float, now: float) -> None:
        """A line when the status changes, and every ``plain_every`` seconds in between (the
        terminal status is left to the summary line)."""
        if snap.status in TERMINAL:
            return
        if self._last_plain is not None:
            at, status = self._last_plain
            if status == snap.status and now - at < self.plain_every:
                return
        self._last_plain = (now, snap.status)
        self.console.print(plain_line(snap, rate), markup=False, highlight=False, soft_wrap=True)


def _plain_every() -> float:
    try:
        return max(0.1, float(os.environ.get(PLAIN_EVERY_ENV, "5")))
    except ValueError:
        return 5.0
