"""The learning-rate schedule: a pure function of the step, so a resumed run needs no
scheduler state."""

from __future__ import annotations

import math
from typing import Callable

from mergekit_dam.core.settings import DamSettings


def lr_factor(settings: DamSettings, steps: int) -> Callable[[int], float]:
    """step (0-based) -> multiplier of `lr`: linear warm-up, then constant, linear or cosine decay."""

    def factor(step: int) -> float:
        if settings.warmup_steps and step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, steps - settings.warmup_steps)
        if settings.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if settings.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor
