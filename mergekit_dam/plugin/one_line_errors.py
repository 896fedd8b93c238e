"""mergekit-yaml lets exceptions escape as tracebacks; a DamError is the user's setup
problem, so once a dam merge runs, an uncaught one prints its one-line message (problem +
fix) and exits 1."""

from __future__ import annotations

import sys

from mergekit_dam.core.errors import DamError


def _one_line_errors(previous_hook):
    def hook(kind, error, traceback):
        if issubclass(kind, DamError):
            print(f"mergekit-dam error: {error}", file=sys.stderr)
            sys.exit(1)
        previous_hook(kind, error, traceback)

    hook.dam_hook = True
    return hook


def install_error_hook() -> None:
    """Report an uncaught DamError as one line; installed when a dam merge's pre-merge stage
    starts (or mergekit-yaml's guard runs), never at import; calling it again is a no-op."""
    if not getattr(sys.excepthook, "dam_hook", False):
        sys.excepthook = _one_line_errors(sys.excepthook)
