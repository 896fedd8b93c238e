"""`lr: auto`: the learning rate chosen by a short probe from the run's own start.

Each candidate rate trains the coefficients for a few steps from the same start, on the
same batches the run itself begins with, and is scored on validation KL; the coefficients
go back to the start after each. The candidates are a grid searched by a climb from its
middle toward lower KL, which stops where the next rate is worse: the grid's best rate when
KL has one valley over it, after 3 or 4 rates instead of 5. Coefficients are O(1/N) numbers that Adam moves by
about `lr` per step whatever the model, so one grid serves every model size; what varies
is how far they may move before the merge gets worse, which the probe measures. The
choice depends only on the config, the seed and the device, so a resumed run repeats it.

Under `max_minutes` the probe takes about a quarter of the budget at most (plus a step and a
validation per rate): the first rate trains until its share (a quarter of that quarter) is spent, and the others train as many steps as
it did, so that the rates are compared on equal terms; with room for fewer than MIN_STEPS
steps the first rate (the grid's middle) is kept without a comparison. How many steps fit
depends on the machine's speed, like everything a time budget decides.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from mergekit_dam.training.loop import NonFiniteLoss, Problem, fit
from mergekit_dam.training.progress import progress_bar
from mergekit_dam.training.selection import TimeBudget

LOG = logging.getLogger("mergekit_dam")

CANDIDATES: Sequence[float] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
BUDGET_SHARE = 0.25  # of `max_minutes`, the most the probe may spend
MIN_STEPS = 3  # fewer steps per rate than this tell the rates apart by noise, not by rate


def probe_steps(steps: int) -> int:
    """Steps per candidate: a tenth of the run, at least 5 and at most 25 (the probe costs
    at most half of a run of any length)."""
    return max(5, min(25, steps // 10))


def climb(score: Callable[[float], float], candidates: Sequence[float] = CANDIDATES, start: int = 2) -> Dict[float, float]:
    """Scores of the rates a descent over the ascending grid evaluates: `start` and the one
    above it, then on in the better direction while the score keeps falling (ties and
    divergence, inf, count as not falling). Returns {rate: score} in evaluation order."""
    scores = {rate: score(rate) for rate in candidates[start : start + 2]}
    step = 1 if len(scores) > 1 and scores[candidates[start + 1]] < scores[candidates[start]] else -1
    at = start + 1 if step == 1 else start
    while 0 <= at + step < len(candidates):
        nxt = candidates[at + step]
        scores[nxt] = score(nxt)
        if not scores[nxt] < scores[candidates[at]]:
            break
        at += step
    return scores


class _NoRoom(Exception):
    """The first rate's share of the budget held fewer than MIN_STEPS steps."""


def choose_lr(problem: Problem, settings, validate: Callable[[], Dict[str, float]], *, ranks=None, quiet: bool = False,
              known: Optional[dict] = None, record: Optional[Callable[[Dict[float, float], int, int], None]] = None,
              budget_minutes: Optional[float] = None) -> Tuple[float, Dict[str, Optional[float]], int]:
    """Run `problem.steps` steps at each rate the climb visits, from the current coefficients
    (put back after each), scored by validate() (KL per expert row); (the best rate, the
    mean validation KL per visited rate, ascending, the tokens the probe trained on).
    `known`: what a stopped run measured (checkpoint.Checkpoints.probe): those rates are not
    trained again, and each rate run is given to `record(scores so far, tokens so far, steps
    per rate)`. `budget_minutes`: the run's `max_minutes`, of which the probe spends at most
    BUDGET_SHARE (fewer steps per rate when the budget is short)."""
    start = [p.detach().clone() for p in problem.params]
    probe = settings.model_copy(update={"warmup_steps": 0, "schedule": "constant", "checkpoint_minutes": 0, "checkpoint_every": 0})
    done = {rate: (math.inf if score is None else score) for rate, score in (known or {}).get("scores", [])}
    tokens, steps = [(known or {}).get("tokens", 0)], [(known or {}).get("steps", problem.steps)]
    # the first rate trained here finds how many steps fit, unless a stopped run already did
    allowance = [budget_minutes * BUDGET_SHARE / 4 if budget_minutes and not done else None]
    progress = progress_bar(4 * steps[0], "DAM lr probe", quiet)  # the climb visits 3 or 4 rates

    def score(lr: float) -> float:
        if lr in done:
            progress.update(steps[0])
            return done[lr]
        timed = TimeBudget(allowance[0]) if allowance[0] else None
        try:
            history = fit(Problem(problem.params, steps[0], problem.micro_batch), probe.model_copy(update={"lr": lr}), progress,
                          ranks=ranks, select=timed)
            tokens[0] += sum(entry["tokens"] for entry in history)
            if timed:
                allowance[0], steps[0], progress.total = None, len(history), 4 * len(history)
            kl = validate()
            mean = sum(kl.values()) / max(1, len(kl))
        except NonFiniteLoss:  # this rate diverges
            mean = float("inf")
        with torch.no_grad():
            for param, value in zip(problem.params, start):
                param.copy_(value)
        done[lr] = mean if math.isfinite(mean) else float("inf")
        if record is not None:
            record(dict(done), tokens[0], steps[0])
        if timed and steps[0] < MIN_STEPS:
            raise _NoRoom
        return done[lr]

    try:
        with progress:
            scores = dict(sorted(climb(score).items()))
    except _NoRoom:
        scores = dict(done)
        LOG.warning("dam: lr: auto: a %g-minute budget leaves room for %d probe step(s) per rate, fewer than %d: lr %g "
                    "(the grid's middle) without a comparison; set `lr`, or give `max_minutes` more", budget_minutes,
                    steps[0], MIN_STEPS, next(iter(scores)))
    best = min(scores, key=lambda lr: (scores[lr], lr))  # ties: the smaller rate
    LOG.info("dam: lr: auto chose %g after %d probe steps per rate (validation KL %s)", best, steps[0],
             ", ".join(f"{lr:g}: {value:.4f}" for lr, value in scores.items()))
    return best, {f"{lr:g}": value if math.isfinite(value) else None for lr, value in scores.items()}, tokens[0]  # None: diverged
