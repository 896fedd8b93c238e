"""The merge and its coefficient gradient as Triton kernels, one pass over the stacked
experts each (GPU only; `kernels.py` decides when they run and keeps the plain PyTorch
path as the reference).

    merge:     W[r, c] = sum_i C[i, c] * E[i, r, c]        float32 accumulation, W in E's dtype
    gradient:  G_c[i, c] = sum_r G[r, c] * E[i, r, c]      float32

Each reads every expert element once (and G once), so its floor is the bytes of N + 1
tensors of W's size. The gradient's row sums are written per chunk of rows and the
chunks added in a fixed order afterwards: no atomics, so a rerun on the same device
gives the same bits. The tile sizes are fixed (no autotuning) for the same reason.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MERGE_TILE = (32, 256, 4)  # rows, columns (contiguous in memory), warps of one merge program (swept on an H200)
GRAD_TILE = (16, 512, 4)  # the same for a gradient program's row block
PROGRAMS = 1024  # gradient programs to aim for: enough to fill a GPU several times over


@triton.jit
def _merge_kernel(c_ptr, e_ptr, w_ptr, R, C, stride, N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < R) & (cols[None, :] < C)
    offsets = rows[:, None].to(tl.int64) * C + cols[None, :]
    merged = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    tile = e_ptr + offsets  # 64-bit pointers, moved one expert on each time: no int32 overflow
    for i in tl.static_range(N):  # unrolled: one tile of each expert, accumulated in float32
        coefficients = tl.load(c_ptr + i * C + cols, mask=cols < C, other=0.0)
        merged += coefficients[None, :] * tl.load(tile, mask=inside, other=0.0).to(tl.float32)
        tile += stride
    tl.store(w_ptr + offsets, merged.to(w_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _grad_kernel(g_ptr, e_ptr, partial_ptr, R, C, stride, N: tl.constexpr, NP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                 CHUNK_ROWS: tl.constexpr):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    experts = tl.arange(0, NP)
    total = tl.zeros((NP, BLOCK_C), dtype=tl.float32)
    for start in range(0, CHUNK_ROWS, BLOCK_R):
        rows = chunk * CHUNK_ROWS + start + tl.arange(0, BLOCK_R)
        inside = (rows[:, None] < R) & (cols[None, :] < C)
        offsets = rows[:, None].to(tl.int64) * C + cols[None, :]
        g = tl.load(g_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        tile = e_ptr + offsets
        for i in tl.static_range(N):  # G's tile is read once for every expert
            column_sums = tl.sum(tl.load(tile, mask=inside, other=0.0).to(tl.float32) * g, axis=0)
            total = tl.where(experts[:, None] == i, total + column_sums[None, :], total)
            tile += stride
    out = partial_ptr + chunk.to(tl.int64) * N * C + experts[:, None] * C + cols[None, :]
    tl.store(out, total, mask=(experts[:, None] < N) & (cols[None, :] < C))


def _as_matrices(experts: torch.Tensor) -> tuple:
    """(N, rows, columns) of a contiguous [N, ..., columns] stack; a 1-D tensor is one row."""
    n, columns = experts.shape[0], experts.shape[-1] if experts.ndim > 1 else 1
    return n, experts[0].numel() // columns, columns


def merge_stack(coefficients: torch.Tensor, experts: torch.Tensor, tile: tuple = MERGE_TILE) -> torch.Tensor:
    """sum_i coefficients[i] * experts[i] (coefficients [N, columns], float32), in experts' dtype."""
    n, rows, columns = _as_matrices(experts)
    block_r, block_c, warps = tile
    coefficients = coefficients.to(device=experts.device, dtype=torch.float32).contiguous()
    merged = torch.empty(experts.shape[1:], dtype=experts.dtype, device=experts.device)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(columns, block_c))
    _merge_kernel[grid](coefficients, experts, merged, rows, columns, rows * columns, N=n, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return merged


def chunk_rows(rows: int, columns: int, tile: tuple = GRAD_TILE) -> int:
    """Rows one gradient program sums: the largest power of two (1024 at most, one tile at
    least) that still gives about PROGRAMS programs. A function of the shape alone, so
    the order of the sums, and the bits, do not depend on the device."""
    chunk, blocks = 1024, triton.cdiv(columns, tile[1])
    while chunk > tile[0] and triton.cdiv(rows, chunk) * blocks < PROGRAMS:
        chunk //= 2
    return chunk


def coefficient_grad(grad: torch.Tensor, experts: torch.Tensor, tile: tuple = GRAD_TILE) -> torch.Tensor:
    """[N, columns] float32: sum over rows of grad * experts[i]."""
    n, rows, columns = _as_matrices(experts)
    block_r, block_c, warps = tile
    grad = grad.contiguous()
    chunk = chunk_rows(rows, columns, tile)
    chunks = triton.cdiv(rows, chunk)
    partial = torch.empty((chunks, n, columns), dtype=torch.float32, device=experts.device)
    _grad_kernel[(chunks, triton.cdiv(columns, block_c))](grad, experts, partial, rows, columns, rows * columns, N=n,
                                                          NP=triton.next_power_of_2(n), BLOCK_R=block_r, BLOCK_C=block_c,
                                                          CHUNK_ROWS=chunk, num_warps=warps)
    return partial.sum(dim=0)
