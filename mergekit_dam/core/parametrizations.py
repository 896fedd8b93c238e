"""How the trained numbers become the [N, D] coefficient table the merge applies.

A parametrization maps `rows` free rows of values to the full table of N rows:
  Weights      merged W = Σ cᵢ ⊙ Wᵢ over every row (the paper's DAM); starts at 1/N.
  TaskVectors  merged W = W_base + Σ_{i≠base} cᵢ ⊙ (Wᵢ − W_base): the base's row is 1 − Σ cᵢ.
A nonlinearity f (NONLINEARITIES) may sit between the raw trained value and cᵢ. The apply
path uses the same classes for a merge without training (`equal_coefficients`), so an
untrained merge is exactly training's start.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

DOMAINS = {"tanh": (-1 + 1e-6, 1 - 1e-6), "sigmoid": (1e-6, 1 - 1e-6)}  # where f's inverse is finite
NONLINEARITIES = {  # f and its inverse (for the initial value f(raw) = 1/N)
    "none": (lambda x: x.clone(), lambda y: y),  # clone: FSDP frees the gathered parameter after forward
    "tanh": (torch.tanh, torch.atanh),
    "sigmoid": (torch.sigmoid, torch.logit),
    "relu": (torch.relu, lambda y: y),
}


class Weights:
    """merged = sum_i c_i * W_i over every row (the paper's DAM); starts at c_i = 1/N."""

    def __init__(self, n: int):
        self.n, self.rows, self.start = n, n, 1.0 / n

    def table(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def values(self, table: torch.Tensor) -> torch.Tensor:
        """The trained rows of a full [N, D] table (the inverse of `table`)."""
        return table


class TaskVectors:
    """merged = W_base + sum_{i != base} c_i * (W_i - W_base): the base row's coefficient
    is 1 - sum_i c_i, so that dL/dc_i = sum_rows dL/dW * (W_i - W_base) and the part the
    experts share with the base cancels. Starts at c_i = `init` (task arithmetic with
    weight λ), or 1/(N-1): the linear average of the experts."""

    def __init__(self, n: int, base_row: int, init: Optional[float] = None):
        self.n, self.rows, self.base_row = n, n - 1, base_row
        self.start = init if init is not None else 1.0 / (n - 1)

    def table(self, values: torch.Tensor) -> torch.Tensor:
        base = 1 - values.sum(dim=0, keepdim=True)
        return torch.cat([values[: self.base_row], base, values[self.base_row :]])

    def values(self, table: torch.Tensor) -> torch.Tensor:
        return torch.cat([table[: self.base_row], table[self.base_row + 1 :]])


def parametrization_for(settings, base_row: Optional[int]) -> Callable[[int], object]:
    """rows -> the settings' parametrization (Weights or TaskVectors); `settings.parametrization`
    already concrete (auto.parametrization)."""
    if settings.parametrization == "task_vectors":
        return lambda n: TaskVectors(n, base_row, settings.init_weight)
    return Weights


def equal_coefficients(settings, names: Sequence[str], base: str) -> torch.Tensor:
    """[rows, 1] coefficients where nothing was trained: training's start. With weights,
    1/N each (the linear average); with task vectors, each expert `init_weight` (unset:
    1/N of the experts, the same average) and the base 1 − Σ, i.e. task arithmetic."""
    start = parametrization_for(settings, names.index(base) if base in names else None)(len(names))
    return start.table(torch.full((start.rows, 1), float(start.start)))
