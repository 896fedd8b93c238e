"""The apply kernel: merged W = sum_i c_i (broadcast over W's last axis) * W_i."""

from __future__ import annotations

from typing import Sequence

import torch


def combine(weights: Sequence[torch.Tensor], coefficients: torch.Tensor) -> torch.Tensor:
    """Merge same-shaped tensors with per-column coefficients, accumulating in float32.

    `coefficients` is [len(weights), weights[0].shape[-1]] (or [len(weights), 1] for
    0-d tensors). Inputs are read, never modified or copied whole: addcmul_ promotes
    bf16/fp16 inputs to the float32 accumulator element by element.
    """
    first = weights[0]
    accumulate = torch.float64 if first.dtype == torch.float64 else torch.float32
    coefficients = coefficients.to(device=first.device, dtype=accumulate)
    result = torch.zeros(first.shape, dtype=accumulate, device=first.device)
    for weight, row in zip(weights, coefficients, strict=True):
        result.addcmul_(weight, row.reshape(()) if weight.ndim == 0 else row)
    return result
