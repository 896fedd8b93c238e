"""Teachers: where expert i's target distribution on a batch comes from.

A teacher has two methods: `prepare(index, batches)`, run once before training on the
batches it will be asked about, and `target(index, batch)`, the keyword arguments of
`objective.expert_loss` for one batch (`teacher=` full logits, or `topk=` cached top-K).
Both take a function `logits(index, batch)` that computes expert `index`'s logits on a
batch, so the same teacher serves end-to-end training (the expert's own weights) and the
last layer-wise stage (the expert's cached hidden states). A new teacher is one class
here, its name in TEACHERS, and that name in the `teacher` setting.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Tuple

import torch

from mergekit_dam.training.data import Batch

Logits = Callable[[int, Batch], torch.Tensor]


class Online:
    """Expert i's full logits, computed for every batch (nothing kept between steps)."""

    def __init__(self, logits: Logits, settings, device: torch.device):
        self.logits = logits

    def prepare(self, index: int, batches: Iterable[Batch]) -> None:
        pass

    def target(self, index: int, batch: Batch) -> dict:
        with torch.no_grad():
            return {"teacher": self.logits(index, batch)}


class TopK:
    """Expert i's top-K log-probabilities at temperature T on every token of its training
    sequences, computed once before training and kept on the CPU: no expert forward
    during training (see objective.topk_kl_divergence for the K + 1 outcomes)."""

    def __init__(self, logits: Logits, settings, device: torch.device):
        self.logits, self.k, self.temperature, self.device = logits, settings.topk, settings.temperature, device
        self.cache: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]] = {}  # (expert, sequence) -> [L, K] each

    def prepare(self, index: int, batches: Iterable[Batch]) -> None:
        with torch.no_grad():
            for batch in batches:
                log_probs = torch.log_softmax(self.logits(index, batch).float() / self.temperature, dim=-1)
                values, indices = log_probs.topk(min(self.k, log_probs.shape[-1]), dim=-1)
                for row, sequence in enumerate(batch.sequences):
                    length = int(batch.mask[row].sum())  # right padding: the real tokens come first
                    self.cache[index, sequence] = (values[row, :length].cpu(), indices[row, :length].cpu())

    def target(self, index: int, batch: Batch) -> dict:
        """The cached entries of the batch's sequences as [B, width, K]; padding positions
        hold zeros, which the mask excludes."""
        entries = [self.cache[index, sequence] for sequence in batch.sequences]
        width, k = batch.ids.shape[1], entries[0][0].shape[-1]
        values = torch.zeros(len(entries), width, k)
        indices = torch.zeros(len(entries), width, k, dtype=torch.long)
        for row, (v, i) in enumerate(entries):
            values[row, : len(v)] = v
            indices[row, : len(i)] = i
        return {"topk": (values.to(self.device), indices.to(self.device))}


TEACHERS = {"online": Online, "topk": TopK}


def make_teacher(settings, logits: Logits, device: torch.device):
    return TEACHERS[settings.teacher](logits, settings, device)
