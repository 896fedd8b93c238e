"""Teachers against a direct computation of what they should return."""

import pytest
import torch

from mergekit_dam.core import auto
from mergekit_dam.core.settings import DamSettings
from mergekit_dam.training.data import Batch, Example
from mergekit_dam.training.teachers import (
    Cached,
    Online,
    TopK,
    cache_bytes,
    TEACHERS,
    make_teacher,
)

SEQUENCES = [Example(ids) for ids in ([5, 6, 7], [8, 9], [1, 2, 3, 4])]


def logits_of(index, batch):
    """A fixed 'expert': logits that depend on the expert, the token and its position."""
    torch.manual_seed(0)
    table = torch.randn(3, 12, 10)
    positions = torch.arange(batch.ids.shape[1])
    return table[index, batch.ids] + 0.1 * positions[None, :, None]


def test_top_k_target_is_each_sequence_s_own_top_k_right_padded():
    settings = DamSettings(teacher="topk", topk=4, temperature=2.0)
    teacher = TopK(logits_of, settings, torch.device("cpu"))
    teacher.prepare(1, [Batch.of(SEQUENCES, [0, 1], 0), Batch.of(SEQUENCES, [2], 0)])
    batch = Batch.of(SEQUENCES, [2, 1, 2], 0)  # another grouping and order than prepared
    values, indices = teacher.target(1, batch)["topk"]
    assert values.shape == (3, 4, 4)
    for row, sequence in enumerate(batch.sequences):
        alone = Batch.of(SEQUENCES, [sequence], 0)
        expected = torch.log_softmax(logits_of(1, alone)[0] / 2.0, -1).topk(4, dim=-1)
        length = len(SEQUENCES[sequence])
        torch.testing.assert_close(values[row, :length], expected.values)
        assert torch.equal(indices[row, :length], expected.indices)
        assert not values[row, length:].any()


def test_online_target_is_the_expert_logits_without_grad():
    calls, weight = [], torch.ones(1, requires_grad=True)

    def logits(index, batch):
        calls.append(index)
        return logits_of(index, batch) * weight

    target = Online(logits, DamSettings(), torch.device("cpu")).target(2, Batch.of(SEQUENCES, [0], 0))["teacher"]
    assert calls == [2] and not target.requires_grad
    torch.testing.assert_close(target, logits_of(2, Batch.of(SEQUENCES, [0], 0)))


ANSWERED = [Example([5, 6, 7], [0, 1, 1]), Example([8, 9]), Example([1, 2, 3, 4], [0, 0, 1, 0])]
# the positions whose logits the loss is on, by hand: those that predict an answer token, and
# the answer's last (it predicts where the answer ends); plain text: all
SCORED = [[1, 1, 1], [1, 1], [0, 1, 1, 0]]


def test_cached_target_is_the_expert_logits_at_the_scored_tokens_in_any_grouping():
    calls = []

    def logits(index, batch):
        calls.append(index)
        return logits_of(index, batch)

    teacher = Cached(logits, DamSettings(teacher="cached"), torch.device("cpu"))
    teacher.prepare(2, [Batch.of(ANSWERED, [0, 1], 0), Batch.of(ANSWERED, [2], 0)])
    calls.clear()
    batch = Batch.of(ANSWERED, [2, 0, 1], 0)  # another grouping, order and padding than prepared
    target = teacher.target(2, batch)["teacher"]
    assert calls == []  # no expert forward per step
    assert target.shape == (3, 4, 10)
    for row, sequence in enumerate(batch.sequences):
        alone = logits_of(2, Batch.of(ANSWERED, [sequence], 0))[0]
        example = ANSWERED[sequence]
        scored = torch.tensor(SCORED[sequence], dtype=torch.bool)
        torch.testing.assert_close(target[row, : len(example)][scored], alone[scored])
        assert not target[row, : len(example)][~scored].any() and not target[row, len(example):].any()


def test_cache_bytes_counts_one_row_of_logits_per_scored_token():
    assert cache_bytes({0: ANSWERED}, 10, torch.float32) == (3 + 2 + 2) * 10 * 4
    assert cache_bytes({0: ANSWERED, 3: ANSWERED[:1]}, 10, torch.bfloat16) == (7 + 3) * 10 * 2


