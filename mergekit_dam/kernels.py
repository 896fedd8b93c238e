"""The merge formula, in one place: W = sum_i c_i * W_i with c_i broadcast over W's last
axis (one coefficient per input column), accumulated in float32 (float64 for float64
inputs), and its coefficient gradient dL/dc_i = sum over rows of dL/dW * W_i.

The apply kernel merges mergekit's tensors (a list); the training view merges a stacked
[N, ...] tensor and differentiates through `ColumnMerge`. A fused GPU kernel plugs in here.
"""

from __future__ import annotations

from typing import Sequence

import torch


def combine(weights: Sequence[torch.Tensor], coefficients: torch.Tensor) -> torch.Tensor:
    """sum_i coefficients[i] * weights[i] in the accumulation dtype (float32, or float64
    for float64 inputs). `coefficients` is [N, weights[0].shape[-1]] ([N, 1] for 0-d
    tensors). Inputs are read, never modified or copied whole: the first product and
    addcmul_ promote bf16/fp16 inputs to the accumulator element by element."""
    first = weights[0]
    accumulate = torch.float64 if first.dtype == torch.float64 else torch.float32
    coefficients = coefficients.to(device=first.device, dtype=accumulate)
    rows = [row.reshape(()) if first.ndim == 0 else row for row in coefficients]
    if len(rows) != len(weights):
        raise ValueError(f"{len(weights)} tensors but {len(rows)} rows of coefficients")
    result = first * rows[0]
    for weight, row in zip(weights[1:], rows[1:]):
        result.addcmul_(weight, row)
    return result


def merge_stack(coefficients: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """combine() over a stacked [N, ...] tensor, returned in the experts' dtype."""
    return combine(experts, coefficients).to(experts.dtype)


def coefficient_grad(grad: torch.Tensor, experts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dL/dc [N, D] from dL/dW: sum over every axis but the last of dL/dW * W_i, reduced
    in at least float32."""
    grad = grad.to(torch.promote_types(grad.dtype, dtype))
    rows = tuple(range(grad.ndim - 1))
    per_expert = [(grad * experts[index]).sum(dim=rows) if rows else grad * experts[index] for index in range(experts.shape[0])]
    return torch.stack(per_expert).to(dtype)


class ColumnMerge(torch.autograd.Function):
    """W = merge_stack(c, experts), keeping nothing for backward but c and the frozen
    stack (persistent anyway); backward turns dL/dW into dL/dc."""

    @staticmethod
    def forward(ctx, coefficients: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(coefficients, experts)
        return merge_stack(coefficients.detach(), experts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        coefficients, experts = ctx.saved_tensors
        return coefficient_grad(grad, experts, coefficients.dtype), None
