"""Training progress: a tqdm bar on a terminal; on a stderr that is not one (nohup, a batch
scheduler, a pipe into a log) a bar's redraws would be megabytes of `\\r` frames, so there
it is one log line every EVERY_PERCENT % of the total or every EVERY_SECONDS seconds,
whichever comes first, with the figures the bar shows (loss, KL, tokens/s) and the ETA.
`--quiet`: nothing."""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Optional

from tqdm.auto import tqdm

LOG = logging.getLogger("mergekit_dam")

EVERY_PERCENT, EVERY_SECONDS = 5, 120


def progress_bar(total: int, desc: str, quiet: bool = False, stream=None):
    """The progress display of one loop of `total` steps: tqdm's interface (update,
    set_postfix, close, a context manager)."""
    if quiet:
        return tqdm(total=total, desc=desc, disable=True)
    if (stream or sys.stderr).isatty():
        return tqdm(total=total, desc=desc, file=stream)
    return SparseProgress(total, desc)


class SparseProgress:
    """tqdm's interface, written as a log line when one is due: after EVERY_PERCENT % more of
    the total, or EVERY_SECONDS since the last line, and at the end."""

    def __init__(self, total: int, desc: str, clock: Callable[[], float] = time.perf_counter):
        self.total, self.desc, self.clock = total, desc, clock
        self.n, self.postfix, self.started = 0, {}, clock()
        self.said_n, self.said_at = 0, self.started
        self.resumed = 0  # steps counted before the first one run here (resumed, or skipped): not in the rate
        self.step = max(1, round(total * EVERY_PERCENT / 100))
        self.due = False

    def update(self, n: int = 1) -> None:
        self.n += n
        self.due = self.due or self.n - self.said_n >= self.step or self.clock() - self.said_at >= EVERY_SECONDS

    def set_postfix(self, **values) -> None:
        """The figures of the step just counted; a due line is written with them."""
        if not self.postfix:  # the first step run here: what was counted before it took no time here
            self.resumed = self.n - 1
        self.postfix = values
        if self.due:
            self._say()

    def close(self) -> None:
        if self.n != self.said_n:
            self._say()

    def __enter__(self) -> "SparseProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self) -> str:
        elapsed = self.clock() - self.started
        run = self.n - self.resumed
        eta = elapsed / run * (self.total - self.n) if run > 0 else None
        figures = "".join(f" {name}={value}" for name, value in self.postfix.items())
        return (f"{self.desc}: {self.n}/{self.total} ({100 * self.n / max(1, self.total):.0f}%){figures} "
                f"elapsed {_duration(elapsed)}" + (f", ETA {_duration(eta)}" if eta is not None and self.n < self.total else ""))

    def _say(self) -> None:
        LOG.info("%s", self.line())
        self.said_n, self.said_at, self.due = self.n, self.clock(), False


def _duration(seconds: Optional[float]) -> str:
    seconds = int(round(seconds or 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"
