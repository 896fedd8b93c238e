"""The merge formula, in one place: W = sum_i c_i * W_i with c_i broadcast over W's last
axis (one coefficient per input column), accumulated in float32 (float64 for float64
inputs), and its coefficient gradient dL/dc_i = sum over rows of dL/dW * W_i.

The apply kernel merges mergekit's tensors (a list); the training view merges a stacked
[N, ...] tensor and differentiates through `ColumnMerge`. On a GPU with Triton the stacked
merge and its gradient run as one fused pass each (`fused.py`); this module is the one
place that chooses, and its plain PyTorch path is the reference the fused kernels are
tested against (and what runs on CPU). `MERGEKIT_DAM_FUSED=0` turns the fused path off.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Callable, Optional, Sequence

import torch

_FUSED = {"enabled": os.environ.get("MERGEKIT_DAM_FUSED", "1") != "0"}
LOG = logging.getLogger("mergekit_dam")


@functools.lru_cache(maxsize=None)
def _triton():
    try:
        from mergekit_dam.core import fused
    except ImportError:  # no triton: the plain path
        return None
    return fused


def fused_for(experts: torch.Tensor):
    """The fused kernels' module when they take this stack (a contiguous CUDA stack of
    matrices or vectors in a float dtype they accumulate exactly), else None."""
    if not (_FUSED["enabled"] and experts.is_cuda and experts.ndim >= 2 and experts.is_contiguous()
            and experts.dtype in (torch.bfloat16, torch.float16, torch.float32) and type(experts) in (torch.Tensor, torch.nn.Parameter)):
        return None
    return _triton()


def _fused_else_plain(fused_call: Optional[Callable], plain_call: Callable) -> torch.Tensor:
    """The fused kernel's result; if Triton cannot build or launch it on this GPU, the
    plain path from now on, said once (the same result up to float32 rounding)."""
    if fused_call is not None:
        try:
            return fused_call()
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # a compiler or driver the kernels do not support
            LOG.warning("dam: the fused Triton kernels failed on this GPU (%s: %s); using the plain PyTorch path",
                        type(error).__name__, (str(error).splitlines() or [""])[0])
            _FUSED["enabled"] = False
    return plain_call()


@contextlib.contextmanager
def plain_kernels():
    """Within: the plain PyTorch path everywhere (benchmarks and tests compare against it)."""
    before = _FUSED["enabled"]
    _FUSED["enabled"] = False
    try:
        yield
    finally:
        _FUSED["enabled"] = before


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


def combine_rows(weights: Sequence[torch.Tensor], columns: torch.Tensor, rows: torch.Tensor,
                 complement: Optional[int] = None) -> torch.Tensor:
    """The row x column merge of [out, in] matrices (`granularity: row_column`):
    sum_i (rows[i] ⊗ columns[i]) ⊙ W_i, or with `complement` k (task vectors, where the base's
    coefficient 1 - sum_i rows[i] ⊗ columns[i] is not a product of a row and a column)
    W_k + sum_{i != k} (rows[i] ⊗ columns[i]) ⊙ (W_i - W_k). `columns` is [N, in], `rows`
    [N, out] (row k of each is not read with a complement); float32 accumulation (float64 for
    float64 inputs), differentiable in `columns` and `rows` by autograd (no fused kernel)."""
    first = weights[0]
    accumulate = torch.float64 if first.dtype == torch.float64 else torch.float32
    columns, rows = columns.to(device=first.device, dtype=accumulate), rows.to(device=first.device, dtype=accumulate)
    if not (len(weights) == columns.shape[0] == rows.shape[0]):
        raise ValueError(f"{len(weights)} tensors but {columns.shape[0]} column rows and {rows.shape[0]} row rows")
    anchor = weights[complement].to(accumulate) if complement is not None else None
    result = anchor.clone() if anchor is not None else torch.zeros(first.shape, dtype=accumulate, device=first.device)
    for index, weight in enumerate(weights):
        if index == complement:
            continue
        part = weight.to(accumulate) if anchor is None else weight.to(accumulate) - anchor
        result = result + rows[index][:, None] * part * columns[index][None, :]
    return result


def merge_stack(coefficients: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """combine() over a stacked [N, ...] tensor, returned in the experts' dtype."""
    fused = fused_for(experts)
    return _fused_else_plain(fused and (lambda: fused.merge_stack(coefficients, experts)),
                             lambda: combine(experts, coefficients).to(experts.dtype))


def coefficient_grad(grad: torch.Tensor, experts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dL/dc [N, D] from dL/dW: sum over every axis but the last of dL/dW * W_i, reduced
    in at least float32."""
    fused = fused_for(experts) if dtype == torch.float32 else None
    return _fused_else_plain(fused and (lambda: fused.coefficient_grad(grad, experts)), lambda: _plain_grad(grad, experts, dtype))


def _plain_grad(grad: torch.Tensor, experts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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
