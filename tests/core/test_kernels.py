import contextlib
import os
import subprocess
import sys

import pytest
import torch

from mergekit_dam.core.kernels import combine


@pytest.mark.parametrize("shape", [(5, 7), (7,), (2, 3, 4)])
def test_combine_matches_naive_sum(shape):
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) for _ in range(3)]
    coefficients = torch.randn(3, shape[-1], generator=generator)
    naive = sum(w.double() * c.double() for w, c in zip(weights, coefficients))
    torch.testing.assert_close(combine(weights, coefficients).double(), naive)


def test_combine_scales_input_columns():
    w = torch.ones(2, 3)
    result = combine([w, 2 * w], torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.25]]))
    torch.testing.assert_close(result, torch.tensor([[1.0, 2.0, 1.0], [1.0, 2.0, 1.0]]))


def test_combine_accumulates_low_precision_in_float32_without_mutating_inputs():
    weights = [torch.full((4, 4), 1.0 / 3, dtype=torch.bfloat16) for _ in range(3)]
    before = [w.clone() for w in weights]
    result = combine(weights, torch.full((3, 4), 1.0 / 3))
    assert result.dtype == torch.float32
    expected = sum(w.float() for w in weights) / 3
    torch.testing.assert_close(result, expected)
    for w, b in zip(weights, before):
        assert torch.equal(w, b)


def test_combine_scalar_tensor():
    result = combine([torch.tensor(2.0), torch.tensor(4.0)], torch.tensor([[0.5], [0.25]]))
    assert result.shape == () and result.item() == 2.0


# --- the fused Triton kernels (fused.py) against the plain path they replace -------------

FUSED_CASES = [  # (N, shape): odd sizes cross every tile edge; a vector is a norm weight
    (3, (37, 300)), (2, (5, 129)), (4, (300, 17)), (3, (64,)), (5, (2, 3, 40)), (3, (1030, 260)),
]


def _reference(coefficients, experts, grad):
    shape = (experts.shape[0],) + (1,) * (experts.ndim - 2) + (experts.shape[-1],)
    merged = (coefficients.double().view(shape) * experts.double()).sum(0)
    gradient = (grad.double()[None] * experts.double()).reshape(experts.shape[0], -1, experts.shape[-1]).sum(1)
    return merged, gradient


def _relative(value, reference):
    return float((value.double() - reference).norm() / reference.norm())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, shape", FUSED_CASES)
def test_fused_kernels_match_the_plain_path_on_gpu(n, shape, dtype):
    from mergekit_dam.core.kernels import (
        coefficient_grad,
        fused_for,
        merge_stack,
        plain_kernels,
    )

    generator = torch.Generator(device="cuda").manual_seed(n)
    experts = torch.randn((n, *shape), generator=generator, device="cuda").to(dtype)
    coefficients = torch.rand(n, shape[-1], generator=generator, device="cuda")
    grad = torch.randn(shape, generator=generator, device="cuda").to(dtype)
    assert fused_for(experts) is not None, "the fused path must take a contiguous CUDA stack"
    merged, gradient = merge_stack(coefficients, experts), coefficient_grad(grad, experts, torch.float32)
    with plain_kernels():
        plain_merged, plain_gradient = merge_stack(coefficients, experts), coefficient_grad(grad, experts, torch.float32)
    reference_merged, reference_gradient = _reference(coefficients, experts, grad)
    assert merged.dtype == dtype and gradient.dtype == torch.float32 and gradient.shape == (n, shape[-1])
    # both accumulate in float32 and round once to `dtype`: the same error against float64
    rounding = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert _relative(merged, reference_merged) < rounding
    assert _relative(merged, plain_merged.double()) < rounding
    assert _relative(gradient, reference_gradient) < 1e-5
    assert _relative(gradient, plain_gradient.double()) < 1e-5
    # no atomics: the same inputs give the same bits
    assert torch.equal(merged, merge_stack(coefficients, experts))
    assert torch.equal(gradient, coefficient_grad(grad, experts, torch.float32))


@pytest.mark.gpu
def test_column_merge_backward_runs_the_fused_gradient_on_gpu():
    from mergekit_dam.core.kernels import ColumnMerge, plain_kernels

    generator = torch.Generator(device="cuda").manual_seed(0)
    experts = torch.randn(3, 1024, 512, generator=generator, device="cuda").bfloat16()
    probe = torch.randn(1024, 512, generator=generator, device="cuda")
    grads = []
    for plain in (False, True):
        coefficients = torch.full((3, 512), 1 / 3, device="cuda", requires_grad=True)
        with plain_kernels() if plain else contextlib.nullcontext():
            (ColumnMerge.apply(coefficients, experts).float() * probe).sum().backward()
        grads.append(coefficients.grad)
    assert _relative(grads[0], grads[1].double()) < 1e-5


def test_fused_kernels_in_the_triton_interpreter():
    """The kernels' indexing and masks on CPU, through Triton's interpreter (CI installs
    triton; a GPU run checks the compiled kernels above)."""
    pytest.importorskip("triton")
    script = (
        "import torch, sys\n"
        "sys.path.insert(0, %r)\n"
        "from test_kernels import FUSED_CASES, _reference, _relative\n"
        "from mergekit_dam.core import fused\n"
        "for n, shape in FUSED_CASES:\n"
        "    g = torch.Generator().manual_seed(n)\n"
        "    experts = torch.randn((n, *shape), generator=g).bfloat16()\n"
        "    coefficients, grad = torch.rand(n, shape[-1], generator=g), torch.randn(shape, generator=g).bfloat16()\n"
        "    merged, gradient = _reference(coefficients, experts, grad)\n"
        "    assert _relative(fused.merge_stack(coefficients, experts), merged) < 8e-3, (n, shape)\n"
        "    assert _relative(fused.coefficient_grad(grad, experts), gradient) < 1e-5, (n, shape)\n"
        "print('ok')\n"
    ) % os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_a_fused_kernel_that_fails_falls_back_to_the_plain_path_once(monkeypatch, caplog):
    from mergekit_dam.core import kernels

    class Broken:
        @staticmethod
        def merge_stack(coefficients, experts):
            raise RuntimeError("PTX .version 9.9 does not support .target sm_200\nmore")

    monkeypatch.setattr(kernels, "_FUSED", {"enabled": True})
    monkeypatch.setattr(kernels, "fused_for", lambda experts: Broken if kernels._FUSED["enabled"] else None)
    experts, coefficients = torch.randn(3, 4, 5), torch.rand(3, 5)
    with caplog.at_level("WARNING", logger="mergekit_dam"):
        merged = kernels.merge_stack(coefficients, experts)
        kernels.merge_stack(coefficients, experts)
    torch.testing.assert_close(merged, (coefficients[:, None, :] * experts).sum(0))
    assert caplog.text.count("the fused Triton kernels failed on this GPU (RuntimeError: PTX .version 9.9") == 1
    assert not kernels._FUSED["enabled"]


def test_combine_rows_is_the_row_column_merge_in_both_forms():
    """Σ (rᵢ ⊗ cᵢ) ⊙ Wᵢ, and W_k + Σ_{i≠k} (rᵢ ⊗ cᵢ) ⊙ (Wᵢ − W_k), written out element by element."""
    from mergekit_dam.core.kernels import combine_rows

    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(4, 6, generator=generator) for _ in range(3)]
    columns, rows = torch.randn(3, 6, generator=generator), torch.randn(3, 4, generator=generator)
    plain = torch.zeros(4, 6, dtype=torch.float64)
    for i in range(3):
        for o in range(4):
            for c in range(6):
                plain[o, c] += float(rows[i, o]) * float(columns[i, c]) * float(weights[i][o, c])
    torch.testing.assert_close(combine_rows(weights, columns, rows).double(), plain, rtol=1e-5, atol=1e-5)  # float32 accumulation
    complement = weights[1].double().clone()
    for i in (0, 2):
        complement += rows[i].double()[:, None] * columns[i].double()[None, :] * (weights[i].double() - weights[1].double())
    torch.testing.assert_close(combine_rows(weights, columns, rows, complement=1).double(), complement, rtol=1e-5, atol=1e-5)
    # with rows of ones it is the column merge (weights form)
    torch.testing.assert_close(combine_rows(weights, columns, torch.ones(3, 4)), combine(weights, columns))


def test_combine_rows_trains_rows_and_columns():
    from mergekit_dam.core.kernels import combine_rows

    weights = torch.randn(2, 3, 5)
    columns, rows = torch.rand(2, 5, requires_grad=True), torch.rand(2, 3, requires_grad=True)
    combine_rows(weights, columns, rows, complement=0).square().sum().backward()
    assert columns.grad is not None and rows.grad is not None
    assert torch.all(rows.grad[0] == 0) and torch.all(columns.grad[0] == 0)  # the complement's rows are not read
