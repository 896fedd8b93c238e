"""One group's coefficient tables (training/coefficients.py): the start, the fixed tables,
and the coarser granularities broadcast to [N, D]."""

import torch

from mergekit_dam.core.parametrizations import TaskVectors, Weights
from mergekit_dam.training.coefficients import Coefficients


def test_columns_start_at_one_over_n_and_untrained_tensors_stay_fixed():
    tables = Coefficients([3, 2], [True, False], Weights(4), "none", "cpu")()
    assert [t.shape for t in tables] == [(4, 3), (4, 2)]
    assert all(torch.allclose(t, torch.full_like(t, 0.25)) for t in tables)
    assert not tables[1].requires_grad and tables[0].requires_grad


def test_layer_granularity_shares_one_value_per_row_and_tensor_one_per_tensor():
    layer = Coefficients([3, 5], [True, True], TaskVectors(3, base_row=0), "none", "cpu", granularity="layer")
    assert len(layer.raw) == 1 and tuple(layer.raw[0].shape) == (2, 1)
    with torch.no_grad():
        layer.raw[0].copy_(torch.tensor([[0.3], [0.5]]))
    first, second = layer()
    assert first.shape == (3, 3) and second.shape == (3, 5)
    torch.testing.assert_close(first[:, 0], torch.tensor([0.2, 0.3, 0.5]))  # the base row is 1 - sum
    assert torch.equal(first[:, :1].expand(3, 5), second)
    tensor = Coefficients([3, 5], [True, True], Weights(2), "none", "cpu", granularity="tensor")
    assert [tuple(p.shape) for p in tensor.raw] == [(2, 1), (2, 1)]


def test_a_warm_start_becomes_the_trained_values_through_the_nonlinearity():
    start = torch.tensor([[0.2, 0.4], [0.8, 0.6]])
    coefficients = Coefficients([2], [True], Weights(2), "sigmoid", "cpu", starts=[start])
    torch.testing.assert_close(coefficients()[0], start)
    torch.testing.assert_close(torch.sigmoid(coefficients.raw[0]), start)
