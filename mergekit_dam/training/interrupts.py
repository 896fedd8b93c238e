"""SIGINT (Ctrl-C) and SIGTERM (a scheduler, `kill`) during a training run, from its first
expensive step: what was costly is kept, the message says what and that the same command
resumes, and the process exits 130 or 143 as a shell expects.

  in the steps      `Interrupts` (loop.fit): the step in progress ends, a checkpoint is
                    written, and the run stops; a second signal stops at once.
  before the steps  `stopping_on_signals` (the whole run): it stops now; the lr probe has
                    kept each rate's score in the checkpoint as it went (lr_probe.py), so
                    the rerun probes only the rates not yet measured.
Installed only in the main thread (where Python delivers signals).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from typing import Optional

LOG = logging.getLogger("mergekit_dam")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """A signal arrived outside the training steps (not an error of the run). A
    KeyboardInterrupt, because libraries let those through where they catch everything
    else (tqdm's logging handler, for one, would swallow another kind mid-write)."""

    def __init__(self, number: int):
        super().__init__(signal.Signals(number).name)
        self.number = number


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class Interrupts:
    """SIGINT and SIGTERM while a checkpointing run trains: the step in progress ends, a
    checkpoint is written, and the run stops (`stop`); a second signal stops at once."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and _main_thread()
        self.signal: Optional[int] = None
        self.previous: dict = {}

    def __enter__(self) -> "Interrupts":
        if self.enabled:
            self.previous = {number: signal.signal(number, self._handle) for number in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame) -> None:
        if self.signal is not None:  # asked twice: no checkpoint, stop now
            raise Stopped(number)
        self.signal = number
        LOG.warning("dam: %s: finishing this step and writing a checkpoint (again to stop at once)", signal.Signals(number).name)

    def stop(self, step: int) -> None:
        LOG.warning("dam: stopped after step %d with a checkpoint; run the same command again to resume", step)
        raise SystemExit(128 + self.signal)


def _kept(checkpoint_path: str, key: str) -> str:
    """What the checkpoint of this training key holds, in words."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(checkpoint_path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError):
        return "nothing costly was kept (data and teachers are prepared again)"
    if metadata.get("key") != key:
        return "nothing costly was kept (data and teachers are prepared again)"
    if "step" in metadata:
        return f"the checkpoint of step {metadata['step']} is kept in {checkpoint_path}"
    rates = len(json.loads(metadata.get("lr_probe", '{"scores": []}'))["scores"])
    return f"the lr probe's scores of {rates} rate{'s' if rates != 1 else ''} are kept in {checkpoint_path}"


@contextlib.contextmanager
def stopping_on_signals(checkpoint_path: str, key: str):
    """Within: SIGINT and SIGTERM stop the run with one message and exit 130 / 143."""
    previous = {}
    if _main_thread():
        def handle(number, frame):
            raise Stopped(number)

        previous = {number: signal.signal(number, handle) for number in SIGNALS}
    try:
        yield
    except Stopped as stopped:
        LOG.warning("dam: %s: stopped; %s; run the same command again to resume", stopped, _kept(checkpoint_path, key))
        raise SystemExit(128 + stopped.number) from None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
