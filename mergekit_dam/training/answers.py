"""Whether each expert has answer tokens to learn from. With `loss_on: answer` the KL is
taken on the answer tokens only, so an example whose answer is cut off by `max_length`, or
is empty, or has no assistant turn, teaches nothing; an expert with no such token at all
would be merged as if it had no data. Checked before training: none left stops the run
with one line; some lost is one warning, and the counts go into the report."""

from __future__ import annotations

import logging
from typing import Sequence

from mergekit_dam.core.errors import DamError

LOG = logging.getLogger("mergekit_dam")


def check_answers(row: str, examples: Sequence, max_length: int) -> dict:
    """{examples, without_answer, cut_by_max_length} of one expert's examples (data.Example);
    raises when none has an answer token."""
    without = [example for example in examples if example.answer is not None and not any(example.answer)]
    cut = sum(1 for example in without if example.cut)
    counts = {"examples": len(examples), "without_answer": len(without), "cut_by_max_length": cut}
    if not without:
        return counts
    why = ", ".join(part for part in (f"{cut} cut off by max_length {max_length}" if cut else "",
                                      f"{len(without) - cut} with an empty answer or no assistant turn" if len(without) > cut else "") if part)
    if len(without) == len(examples):
        raise DamError(f"dam: expert {row} has no answer token to learn from: all {len(examples)} of its examples lose their "
                       f"answers ({why}); raise max_length, shorten the prompts, or fix the records (or use loss_on: all)")
    LOG.warning("dam: %s: %d of %d examples (%.0f%%) have no answer token to learn from (%s); they teach nothing",
                row, len(without), len(examples), 100 * len(without) / len(examples), why)
    return counts
