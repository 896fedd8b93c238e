"""evaluate.held_out_kl: the mean KL over the scored tokens, checked against a direct
per-token computation, and the same whatever the batching."""

import torch

from mergekit_dam.training.data import Batch, Example
from mergekit_dam.training.evaluate import held_out_kl

VOCAB = 11


def _logits(seed: int):
    """Logits that depend only on (sequence, position): the same in any batch."""
    def logits(sequences, width):
        rows = []
        for sequence in sequences:
            g = torch.Generator().manual_seed(seed * 1000 + sequence)
            rows.append(torch.randn(16, VOCAB, generator=g)[:width])  # drawn at one size: the same rows in any batch
        return torch.stack(rows)
    return logits


def _examples():
    g = torch.Generator().manual_seed(0)
    examples = []
    for k in range(7):
        length = 3 + k % 4
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        answer = None if k % 3 == 0 else [0] * (length - 2) + [1, 1]  # plain text: every token scored
        examples.append(Example(ids, answer))
    return examples


def test_the_kl_is_a_mean_over_tokens_whatever_the_batching():
    examples, student, teacher = _examples(), _logits(1), _logits(2)
    t = 1.5
    expected_total, expected_count = 0.0, 0
    for k, example in enumerate(examples):
        s, p = student([k], len(example))[0].double() / t, teacher([k], len(example))[0].double() / t
        per_token = (p.softmax(-1) * (p.log_softmax(-1) - s.log_softmax(-1))).sum(-1) * t**2
        # the positions that predict the two answer tokens, and the answer's last (where it ends)
        scored = torch.ones(len(example)) if example.answer is None else torch.tensor([0] * (len(example) - 3) + [1, 1, 1], dtype=torch.double)
        expected_total += float((per_token * scored).sum())
        expected_count += int(scored.sum())
    expected = expected_total / expected_count
    for size in (1, 3, 7):
        batches = {0: [Batch.of(examples, range(k, min(k + size, len(examples))), 0) for k in range(0, len(examples), size)]}
        result = held_out_kl(["expert"], batches, lambda b: student(b.sequences, b.ids.shape[1]),
                             lambda i, b: teacher(b.sequences, b.ids.shape[1]), t, torch.device("cpu"))
        assert abs(result["expert"] - expected) < 1e-5, size
