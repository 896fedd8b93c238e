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


def test_a_probe_continues_from_the_rates_a_stopped_run_measured():
    """choose_lr trains only the rates it has no score for, keeps each new one as it goes,
    and chooses what a probe from scratch chooses."""
    import torch

    from mergekit_dam.core.settings import DamSettings
    from mergekit_dam.training.loop import Problem
    from mergekit_dam.training.lr_probe import choose_lr

    target = torch.tensor([0.3, -0.2])
    param = torch.nn.Parameter(torch.zeros(2))
    runs = []

    def micro_batch(step, micro):
        runs.append(step)
        return ((param - target) ** 2).sum(), 1, {}

    def validate():
        return {"a": float(((param.detach() - target) ** 2).sum())}

    problem, settings = Problem([param], 5, micro_batch), DamSettings(grad_clip=0)
    recorded = []
    fresh = choose_lr(problem, settings, validate, quiet=True, record=lambda scores, tokens: recorded.append((dict(scores), tokens)))
    assert len(runs) == 5 * len(recorded) and [len(scores) for scores, _ in recorded] == list(range(1, len(recorded) + 1))
    first, tokens = recorded[0]
    runs.clear()
    known = {"scores": [[rate, score] for rate, score in first.items()], "tokens": tokens}
    resumed = choose_lr(problem, settings, validate, quiet=True, known=known)
    assert resumed == fresh and len(runs) == 5 * (len(recorded) - 1)  # the kept rate is not trained again
