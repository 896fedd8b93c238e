"""Experts that hold each other back, read from the end of training (end-to-end mode).

On an expert's own training examples the merge is free to fit it: what is left there of the
linear start's KL is what its partners did not let the coefficients remove (more data would
not help; these are the examples it trained on). An expert whose share left stays far above
its partners' is held back by them, the conflict the lab's letter shift shows (13% left,
against 1-3% for its three partners, in a lab run at the package defaults on 2026-12-03). The run says so in one line, with what
to try, and the report keeps the shares (`held_back`).
"""

from __future__ import annotations

import statistics
from typing import Dict, Mapping, Optional

# flagged: at least this share of its linear-start KL left on its own training examples...
FLOOR = 0.05
# ...and this many times its partners' median share
RATIO = 3.0


def shares_left(start: Mapping[str, float], fit: Mapping[str, float], retain_row: Optional[str] = None) -> Dict[str, float]:
    """Per expert: its final KL on its own training examples over its linear-start KL. The
    retain data's row (`retain_row`, the base's) is left out: it holds no skill a partner could
    hold back, its KL is what the skills are allowed to cost."""
    return {row: fit[row] / start[row] for row in fit if start.get(row, 0) > 0 and row != retain_row}


def held_back(start: Mapping[str, float], fit: Mapping[str, float], retain_row: Optional[str] = None) -> Dict[str, float]:
    """{expert: share left} of the experts whose partners hold them back (two experts or more)."""
    shares = shares_left(start, fit, retain_row)
    flagged = {}
    for row, share in shares.items():
        partners = [value for other, value in shares.items() if other != row]
        if partners and share >= FLOOR and share >= RATIO * statistics.median(partners):
            flagged[row] = share
    return flagged


def conflict_line(start: Mapping[str, float], fit: Optional[Mapping[str, float]], granularity: str,
                  retain_row: Optional[str] = None) -> Optional[str]:
    """The one warning line naming the held-back experts and what to try, or None."""
    flagged = held_back(start, fit or {}, retain_row)
    if not flagged:
        return None
    shares = shares_left(start, fit, retain_row)
    partners = [value for row, value in shares.items() if row not in flagged]
    names = ", ".join(f"{row} ({share:.0%})" for row, share in flagged.items())
    typical = f"{statistics.median(partners):.0%}" if partners else "less"
    tries = "more `steps`" + (", `granularity: row_column`" if granularity == "column" else "") + \
        ", or a merge without one of its partners (merge the others, then add it with its own run)"
    return (f"dam: experts whose partners hold them back: on their own training examples the merge keeps {names} of "
            f"the linear average's KL, where the others keep {typical}; try {tries}")
