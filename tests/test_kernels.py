import pytest
import torch

from mergekit_dam.kernels import combine


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
