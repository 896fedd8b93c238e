"""The conflict signal (training/conflicts.py), on the figures of the lab run that shows one
and on runs that do not."""

from mergekit_dam.training.conflicts import conflict_line, held_back, shares_left

# the lab at the package defaults (benchmarks/results/peers_lab_2026-12-03): linear-start KL, and
# the final KL on each expert's own training examples
START = {"arithmetic": 8.554, "shift": 6.089, "translate": 14.884, "brackets": 9.920}
FIT = {"arithmetic": 0.216, "shift": 0.797, "translate": 0.377, "brackets": 0.130}


def test_the_lab_s_shift_expert_is_named_held_back_by_its_partners():
    shares = shares_left(START, FIT)
    assert round(shares["shift"], 3) == round(0.797 / 6.089, 3)
    assert held_back(START, FIT) == {"shift": shares["shift"]}
    line = conflict_line(START, FIT, "column")
    assert line.startswith("dam: experts whose partners hold them back") and "shift (13%)" in line
    assert "granularity: row_column" in line and "\n" not in line
    assert "granularity: row_column" not in conflict_line(START, FIT, "row_column")  # already tried


def test_no_signal_when_every_expert_fits_alike_or_is_nearly_fit():
    even = {row: 0.1 * start for row, start in START.items()}
    assert held_back(START, even) == {} and conflict_line(START, even, "column") is None
    # 3x its partners, but with 2% left there is nothing to hold back
    small = {**{row: 0.005 * start for row, start in START.items()}, "shift": 0.02 * START["shift"]}
    assert held_back(START, small) == {}
    assert conflict_line(START, None, "column") is None  # layer-wise mode: no training KL
    assert held_back({"a": 1.0}, {"a": 0.9}) == {}  # one expert: no partners


def test_the_retain_set_s_row_is_never_named_and_is_no_partner():
    """With a retain set the base's row keeps more of its start (the skills cost general text):
    that is no expert held back, and it does not lower the partners' median either (the
    second real-model setup's retain run, 2026-12-04: the base's row kept 129%)."""
    start, fit = {**START, "base": 1.31}, {**FIT, "base": 1.68}
    assert "base" in held_back(start, fit)  # read as an expert it would be flagged
    assert held_back(start, fit, "base") == held_back(START, FIT)
    assert "base" not in shares_left(start, fit, "base")
    assert conflict_line(start, fit, "column", "base") == conflict_line(START, FIT, "column")
