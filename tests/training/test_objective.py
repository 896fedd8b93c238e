import math

import torch

from mergekit_dam.core.settings import DamSettings
from mergekit_dam.training.objective import (
    balanced,
    coefficient_norms,
    cosine_similarity,
    entropy,
    expert_loss,
    kl_divergence,
    topk_kl_divergence,
)


def test_kl_matches_hand_computation_with_temperature_and_padding():
    student = torch.tensor([[[0.0, 1.0], [5.0, -5.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 0]])  # second token is padding: ignored
    t = 2.0
    p = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    q = [1 / (math.exp(0.5) + 1), math.exp(0.5) / (math.exp(0.5) + 1)]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) * t * t
    assert abs(kl_divergence(student, teacher, mask, t).item() - expected) < 1e-6
    assert kl_divergence(teacher, teacher, torch.ones(1, 2), t).abs().item() < 1e-7


def test_topk_kl_has_a_tail_bucket_and_equals_full_kl_at_k_equal_v():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 10, generator=generator)
    teacher = torch.randn(2, 3, 10, generator=generator)
    mask = torch.ones(2, 3)
    log_p = torch.log_softmax(teacher / 2.0, dim=-1)
    values, indices = log_p.topk(10, dim=-1)
    torch.testing.assert_close(topk_kl_divergence(student, values, indices, mask, 2.0), kl_divergence(student, teacher, mask, 2.0))
    # K = 2, by hand: the two top tokens plus one bucket for the other eight
    values, indices = log_p.topk(2, dim=-1)
    log_q = torch.log_softmax(student / 2.0, dim=-1)
    p = torch.cat([values.exp(), 1 - values.exp().sum(-1, keepdim=True)], -1)
    q_top = log_q.gather(-1, indices).exp()
    q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * 4
    torch.testing.assert_close(topk_kl_divergence(student, values, indices, mask, 2.0), expected)


def test_cosine_similarity_is_mean_over_pairs_then_tensors():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # pairs: 0, 1/sqrt2, 1/sqrt2
    b = torch.tensor([[1.0, 2.0], [2.0, 4.0], [1.0, 2.0]])  # all pairs: 1
    expected = ((0 + 2 / math.sqrt(2)) / 3 + 1) / 2
    assert abs(cosine_similarity([a, b]).item() - expected) < 1e-6


def test_norms_are_not_squared():
    l1, l2 = coefficient_norms([torch.tensor([[3.0, -4.0]]), torch.tensor([[0.0]])])
    assert (l1.item(), l2.item()) == (7.0, 5.0)


def test_entropy_and_options():
    uniform = torch.zeros(1, 1, 4)
    assert abs(entropy(uniform, torch.ones(1, 1), 2.0).item() - math.log(4)) < 1e-6
    settings = DamSettings(entropy_weight=0.5, mse_weight=2.0)
    student, teacher = torch.zeros(1, 1, 4), torch.ones(1, 1, 4)
    loss, kl = expert_loss(student, torch.ones(1, 1), settings, teacher=teacher)
    assert abs(kl.item()) < 1e-7
    assert abs(loss.item() - (0.5 * math.log(4) + 2.0 * 1.0)) < 1e-6


def test_cosine_similarity_of_mixed_shapes_matches_a_loop_over_tensors_and_pairs():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (3, 7), (3, 5), (2, 4), (1, 3), (4, 5)]
    tables = [torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_() for shape in shapes]
    means = []
    for table in tables:
        n = table.shape[0]
        pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
        if pairs:
            means.append(sum(table[a] @ table[b] / (table[a].norm() * table[b].norm()) for a, b in pairs) / len(pairs))
    expected = sum(means) / len(means)
    result = cosine_similarity(tables)
    assert abs(result.item() - expected.item()) < 1e-12
    paired = [t for t in tables if t.shape[0] > 1]  # a one-row table has no pair: not in the mean
    for got, want in zip(torch.autograd.grad(result, paired), torch.autograd.grad(expected, paired)):
        torch.testing.assert_close(got, want)


def test_balance_weighs_each_loss_by_its_share_without_differentiating_the_weights():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    losses = [x[0] ** 2, 3 * x[1]]  # 1 and 6, gradients 2 and 3 alone
    assert balanced(losses, 0.0).item() == 7.0
    total = balanced(losses, 1.0)
    # by hand: weights 2 * (1, 6) / 7; the loss keeps its scale (mean weight 1)
    assert math.isclose(total.item(), 2 / 7 * 1 + 12 / 7 * 6, rel_tol=1e-6)
    total.backward()
    # the weights are constants: d/dx0 = 2/7 * 2, d/dx1 = 12/7 * 3
    torch.testing.assert_close(x.grad, torch.tensor([4 / 7, 36 / 7]))
    squared = balanced([torch.tensor(1.0), torch.tensor(6.0)], 2.0)
    assert math.isclose(squared.item(), 2 * (1 + 216) / 37, rel_tol=1e-6)
