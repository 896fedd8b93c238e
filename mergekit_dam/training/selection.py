"""Validation-driven training: measure the validation KL every few steps, keep the best
coefficients seen (the linear start included), stop when it has not improved for
`patience` evaluations or when the time budget is spent, and hand back the best.

So the written coefficients are never worse on validation KL than the linear average
they start from, and a run that never beat it says so. The state (best tensors, curve,
counters) travels in the training checkpoint, so a resumed run selects what an
uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Dict, List, Optional

import torch

LOG = logging.getLogger("mergekit_dam")


def evaluation_interval(eval_every: int, steps: int) -> int:
    """`eval_every`, or (0) about 20 evaluations per run."""
    return eval_every or max(1, steps // 20)


class TimeBudget:
    """fit()'s `select` with a clock only: the run stops after the step during which
    `max_minutes` ran out (fit asks over_budget() before each step, and the ranks agree on
    the answer). The learning-rate probe times its first rate with it; KeepBest adds
    validation to it."""

    def __init__(self, max_minutes: Optional[float]):
        self.max_minutes, self.clock = max_minutes, time.perf_counter()

    def over_budget(self) -> bool:
        """Whether this process has spent `max_minutes`."""
        return self.max_minutes is not None and time.perf_counter() - self.clock >= 60 * self.max_minutes

    def after_step(self, step: int, spent: bool = False) -> bool:
        """After optimizer step `step`: True = stop now (the budget is spent)."""
        return spent

    def finish(self) -> None:
        pass


class KeepBest(TimeBudget):
    """params: the raw coefficients by name; validate(): validation KL per expert row."""

    def __init__(self, params: Dict[str, torch.nn.Parameter], validate: Callable[[], Dict[str, float]], *, every: int, steps: int,
                 patience: int = 0, max_minutes: Optional[float] = None, keep_best: bool = True):
        super().__init__(max_minutes)
        self.params, self.validate, self.every, self.steps = params, validate, every, steps
        self.patience, self.keep_best = patience, keep_best
        self.curve: List[dict] = []
        self.best_step, self.best_mean = 0, float("inf")
        self.best: Dict[str, torch.Tensor] = {}
        self.stale = 0  # evaluations since the last improvement
        self.stopped_at: Optional[int] = None
        self.why: Optional[str] = None

    def measure(self, step: int) -> bool:
        """Evaluate at `step` (0: the start); True when this is the best so far."""
        kl = self.validate()
        mean = sum(kl.values()) / max(1, len(kl))
        self.curve.append({"step": step, "kl": kl, "mean": mean})
        if mean < self.best_mean:
            self.best_step, self.best_mean, self.stale = step, mean, 0
            self.best = {name: p.detach().clone() for name, p in self.params.items()}
            return True
        self.stale += 1
        return False

    def after_step(self, step: int, spent: bool = False) -> bool:
        """After optimizer step `step` (1-based): evaluate when due; True = stop now.
        `spent`: the time budget is spent (decided by the loop, the same on every rank)."""
        if step % self.every == 0 or step == self.steps:
            self.measure(step)
            if self.patience and self.stale >= self.patience and step < self.steps:
                self.stopped_at, self.why = step, f"no improvement in {self.patience} evaluations"
                return True
        if spent and step < self.steps:
            if self.curve[-1]["step"] != step:
                self.measure(step)
            self.stopped_at, self.why = step, f"the {self.max_minutes:g}-minute budget is spent"
            return True
        return False

    def finish(self) -> None:
        """Put the best coefficients back (keep_best), and say what was kept."""
        if self.stopped_at is not None:
            LOG.info("dam: stopped after step %d of %d: %s", self.stopped_at, self.steps, self.why)
        if not self.keep_best or not self.best:
            return
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.best[name])
        start = self.curve[0]["mean"] if self.curve and self.curve[0]["step"] == 0 else None
        if self.best_step == 0:
            LOG.warning("dam: training never improved on the starting coefficients' validation KL (%.4f); writing the start "
                        "(the linear average, or init_from's). Try a lower `lr` or more data", self.best_mean)
        else:
            LOG.info("dam: keeping the coefficients of step %d (validation KL %.4f%s)", self.best_step, self.best_mean,
                     f", linear start {start:.4f}" if start is not None else "")

    def report(self) -> dict:
        start = next((point["mean"] for point in self.curve if point["step"] == 0), None)
        return {"every": self.every, "patience": self.patience, "keep_best": self.keep_best, "curve": self.curve,
                "best_step": self.best_step, "best_mean": self.best_mean, "start_mean": start,
                "improved_on_start": self.best_step != 0, "stopped_at": self.stopped_at, "stop_reason": self.why}

    # --- checkpoints ------------------------------------------------------------------

    def state(self) -> tuple:
        """(tensors, metadata) for the checkpoint."""
        tensors = {f"best/{name}": t for name, t in self.best.items()}
        metadata = {"selection": json.dumps({"curve": self.curve, "best_step": self.best_step, "best_mean": self.best_mean,
                                             "stale": self.stale})}
        return tensors, metadata

    def restore_state(self, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
        saved = json.loads(metadata["selection"])
        self.curve, self.best_step, self.best_mean, self.stale = saved["curve"], saved["best_step"], saved["best_mean"], saved["stale"]
        self.best = {name[len("best/"):]: t for name, t in tensors.items() if name.startswith("best/")}


def validation_chart(report: dict, path: str) -> Optional[str]:
    """The validation curve per expert and the mean, the kept step marked, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from mergekit_dam.core.atomic import atomic_write

    curve = report["curve"]
    steps = [point["step"] for point in curve]
    figure, axis = plt.subplots(figsize=(7, 4))
    for row in curve[0]["kl"] if curve else []:
        axis.plot(steps, [point["kl"][row] for point in curve], alpha=0.6, label=row.rsplit("/", 1)[-1])
    axis.plot(steps, [point["mean"] for point in curve], color="black", linewidth=2, label="mean")
    axis.axvline(report["best_step"], color="gray", linestyle="--", label=f"kept: step {report['best_step']}")
    axis.set_xlabel("step")
    axis.set_ylabel("validation KL")
    axis.legend(fontsize=7)
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=100))
    plt.close(figure)
    return path
