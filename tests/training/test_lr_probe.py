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
    fresh = choose_lr(problem, settings, validate, quiet=True, record=lambda scores, tokens, steps: recorded.append((dict(scores), tokens)))
    assert len(runs) == 5 * len(recorded) and [len(scores) for scores, _ in recorded] == list(range(1, len(recorded) + 1))
    first, tokens = recorded[0]
    runs.clear()
    known = {"scores": [[rate, score] for rate, score in first.items()], "tokens": tokens}
    resumed = choose_lr(problem, settings, validate, quiet=True, known=known)
    assert resumed == fresh and len(runs) == 5 * (len(recorded) - 1)  # the kept rate is not trained again


class _Clock:
    """A stand-in for lr_probe's time module: `seconds_per_step` pass with every step trained."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def _timed_problem(steps, seconds_per_step, clock):
    import torch

    from mergekit_dam.training.loop import Problem

    target = torch.tensor([0.3, -0.2])
    param = torch.nn.Parameter(torch.zeros(2))
    runs = []

    def micro_batch(step, micro):
        runs.append(step)
        clock.now += seconds_per_step
        return ((param - target) ** 2).sum(), 1, {}

    def validate():
        return {"a": float(((param.detach() - target) ** 2).sum())}

    return Problem([param], steps, micro_batch), validate, runs


def _rates_run(runs):
    """The step counts of the successive rates in a log of trained steps (each rate counts from 0)."""
    counts = []
    for step in runs:
        if step == 0:
            counts.append(0)
        counts[-1] += 1
    return counts


def test_under_max_minutes_the_probe_fits_a_quarter_of_the_budget_and_every_rate_trains_as_many_steps(monkeypatch):
    """The defect it guards against: a 25-step probe per rate took a whole `max_minutes` on a
    slow machine and left the run one step. Here a step takes 1 s and the budget is 4 min:
    the probe spends about 60 s (15 s a rate, plus the step during which the time ran out),
    all rates train the same steps, and a resumed probe keeps that count."""
    from mergekit_dam.core.settings import DamSettings
    from mergekit_dam.training import lr_probe, selection

    clock = _Clock()
    monkeypatch.setattr(selection, "time", clock)  # the probe's first rate is timed by selection.TimeBudget
    problem, validate, runs = _timed_problem(25, 1.0, clock)
    recorded = []
    chosen, scores, _ = lr_probe.choose_lr(problem, DamSettings(grad_clip=0), validate, quiet=True, budget_minutes=4,
                                           record=lambda s, tokens, steps: recorded.append((dict(s), tokens, steps)))
    counts = _rates_run(runs)
    assert len(counts) in (3, 4) and len(set(counts)) == 1 and counts[0] == 16  # 15 s, then the step that passed it
    assert clock.now <= 60 * 4 * lr_probe.BUDGET_SHARE + len(counts)
    assert [steps for _, _, steps in recorded] == [16] * len(counts)
    runs.clear()
    first, tokens, steps = recorded[0]
    known = {"scores": [[rate, score] for rate, score in first.items()], "tokens": tokens, "steps": steps}
    again = lr_probe.choose_lr(problem, DamSettings(grad_clip=0), validate, quiet=True, budget_minutes=4, known=known)
    assert again[0] == chosen and _rates_run(runs) == [16] * (len(counts) - 1)
    clock.now = 0.0
    runs.clear()
    lr_probe.choose_lr(problem, DamSettings(grad_clip=0), validate, quiet=True, budget_minutes=60)
    assert _rates_run(runs) == [25] * len(counts)  # a long budget: the probe's usual steps


def test_a_budget_with_no_room_for_the_probe_keeps_the_grid_s_middle_rate_and_says_so(monkeypatch, caplog):
    from mergekit_dam.core.settings import DamSettings
    from mergekit_dam.training import lr_probe, selection

    clock = _Clock()
    monkeypatch.setattr(selection, "time", clock)  # the probe's first rate is timed by selection.TimeBudget
    problem, validate, runs = _timed_problem(25, 100.0, clock)
    with caplog.at_level("WARNING", logger="mergekit_dam"):
        chosen, scores, _ = lr_probe.choose_lr(problem, DamSettings(grad_clip=0), validate, quiet=True, budget_minutes=4)
    assert chosen == lr_probe.CANDIDATES[2] and list(scores) == [f"{chosen:g}"] and _rates_run(runs) == [2]
    assert any("leaves room for 2 probe step(s) per rate" in r.getMessage() and "set `lr`" in r.getMessage() for r in caplog.records)
