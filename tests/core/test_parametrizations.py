"""Parametrizations against what they state (core/parametrizations.py): the full table of a
task-vector merge, its inverse, and the untrained start every merge shares."""

import torch

from mergekit_dam.core.parametrizations import NONLINEARITIES, TaskVectors, Weights, equal_coefficients, parametrization_for
from mergekit_dam.core.settings import DamSettings


def test_task_vectors_put_one_minus_the_sum_in_the_base_row_and_invert():
    values = torch.tensor([[0.2, 0.5], [0.3, -0.1]])  # two experts, two columns
    form = TaskVectors(3, base_row=1)
    table = form.table(values)
    assert torch.equal(table[0], values[0]) and torch.equal(table[2], values[1])
    torch.testing.assert_close(table[1], 1 - values.sum(0))
    assert torch.equal(form.values(table), values)
    w = torch.randn(3, 4, 2, dtype=torch.float64)  # merged = base + sum_i c_i (W_i - base) for any W
    merged = (table.double()[:, None, :] * w).sum(0)
    expected = w[1] + sum(values.double()[k][None, :] * (w[i] - w[1]) for k, i in enumerate((0, 2)))
    torch.testing.assert_close(merged, expected)


def test_weights_are_the_table_itself_and_start_at_one_over_n():
    form = Weights(4)
    assert (form.rows, form.start) == (4, 0.25)
    values = torch.rand(4, 3)
    assert form.table(values) is values and form.values(values) is values


def test_equal_coefficients_are_the_linear_average_or_task_arithmetic():
    names = ["a", "base", "b"]
    linear = equal_coefficients(DamSettings(parametrization="weights"), names, "base")
    torch.testing.assert_close(linear, torch.full((3, 1), 1 / 3))
    average = equal_coefficients(DamSettings(parametrization="task_vectors"), names, "base")
    torch.testing.assert_close(average, torch.tensor([[0.5], [0.0], [0.5]]))
    arithmetic = equal_coefficients(DamSettings(parametrization="task_vectors", init_weight=0.7), names, "base")
    torch.testing.assert_close(arithmetic, torch.tensor([[0.7], [-0.4], [0.7]]))
    assert parametrization_for(DamSettings(parametrization="weights"), None) is Weights


def test_each_nonlinearity_inverts_its_start():
    for name, (f, inverse) in NONLINEARITIES.items():
        start = torch.tensor(0.25)
        torch.testing.assert_close(f(inverse(start)), start, msg=name)
