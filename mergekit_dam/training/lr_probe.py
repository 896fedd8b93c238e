"""`lr: auto`: the learning rate chosen by a short probe from the run's own start.

Each candidate rate trains the coefficients for a few steps from the same start, on the
same batches the run itself begins with; the one with the lowest validation KL wins and
the coefficients go back to the start. Coefficients are O(1/N) numbers that Adam moves by
about `lr` per step whatever the model, so one grid serves every model size; what varies
is how far they may move before the merge gets worse, which the probe measures. The
choice depends only on the config, the seed and the device, so a resumed run repeats it.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from mergekit_dam.training.loop import NonFiniteLoss, Stage, fit

LOG = logging.getLogger("mergekit_dam")

CANDIDATES: Sequence[float] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def probe_steps(steps: int) -> int:
    """Steps per candidate: a tenth of the run, at least 5 and at most 25 (the probe costs
    at most half of a run of any length)."""
    return max(5, min(25, steps // 10))


def choose_lr(stage: Stage, settings, validate: Callable[[], Dict[str, float]], *, ranks=None,
              quiet: bool = False) -> Tuple[float, Dict[str, Optional[float]], int]:
    """Run `stage.steps` steps at each candidate rate from the current coefficients (put
    back after each), score validate() (KL per expert row); (the best rate, the mean
    validation KL per rate, the tokens the probe trained on)."""
    start = [p.detach().clone() for p in stage.params]
    probe = settings.model_copy(update={"warmup_steps": 0, "schedule": "constant", "checkpoint_minutes": 0, "checkpoint_every": 0})
    scores, tokens = {}, 0
    with tqdm(total=len(CANDIDATES) * stage.steps, desc="DAM lr probe", disable=quiet) as progress:
        for lr in CANDIDATES:
            try:
                history = fit(stage, probe.model_copy(update={"lr": lr}), progress, ranks=ranks)
                tokens += sum(entry["tokens"] for entry in history)
                kl = validate()
                mean = sum(kl.values()) / max(1, len(kl))
            except NonFiniteLoss:  # this rate diverges
                mean = float("inf")
            scores[lr] = mean if math.isfinite(mean) else float("inf")
            with torch.no_grad():
                for param, value in zip(stage.params, start):
                    param.copy_(value)
    best = min(CANDIDATES, key=lambda lr: scores[lr])  # ties: the smaller rate (the grid is ascending)
    LOG.info("dam: lr: auto chose %g after %d probe steps per rate (validation KL %s)", best, stage.steps,
             ", ".join(f"{lr:g}: {score:.4f}" for lr, score in scores.items()))
    return best, {f"{lr:g}": score if math.isfinite(score) else None for lr, score in scores.items()}, tokens  # None: diverged
