"""lr_probe.climb: the grid's best rate, found by a descent from the middle, against the
argmin over the whole grid."""

import math

import pytest

from mergekit_dam.training.lr_probe import CANDIDATES, climb


@pytest.mark.parametrize("best", range(len(CANDIDATES)))
def test_the_climb_finds_the_grid_s_best_rate_in_3_or_4_rates(best):
    visited = []

    def score(lr):
        visited.append(lr)
        return (math.log10(lr) - math.log10(CANDIDATES[best])) ** 2 + 0.1 * math.log10(lr)  # one valley, not symmetric

    whole = {lr: score(lr) for lr in CANDIDATES}
    visited.clear()
    scores = climb(score)
    assert min(scores, key=scores.get) == min(whole, key=whole.get) == CANDIDATES[best]
    assert visited == list(scores) and len(visited) in (3, 4) and len(set(visited)) == len(visited)
    assert all(scores[lr] == whole[lr] for lr in scores)


def test_diverging_rates_turn_the_climb_down():
    scores = climb(lambda lr: math.inf if lr >= 3e-2 else -math.log10(lr) * 0 + (1 if lr == 1e-2 else 2))
    assert list(scores) == [1e-2, 3e-2, 3e-3] and min(scores, key=scores.get) == 1e-2


def test_a_flat_score_stays_at_the_start_and_the_smaller_rate_wins_ties():
    scores = climb(lambda lr: 1.0)
    assert list(scores) == [1e-2, 3e-2, 3e-3]
    assert min(sorted(scores), key=lambda lr: (scores[lr], lr)) == 3e-3
