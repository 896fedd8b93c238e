"""Teachers: where expert i's target distribution on a batch comes from.

A teacher has two methods: `prepare(index, batches)`, run once before training on padded
batches of the sequences it will be asked about, and `target(index, batch)`, the keyword
arguments of `objective.expert_loss` for one batch, padded or packed (`teacher=` full
logits, or `topk=` cached top-K, each sequence's at its place in the batch).
Both take a function `logits(index, batch)` that computes expert `index`'s logits on a
batch, so the same teacher serves end-to-end training (the expert's own weights) and the
last layer-wise stage (the expert's cached hidden states). A new teacher is one class
here, its name in TEACHERS, and that name in the `teacher` setting.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Mapping, Sequence, Tuple

import torch

from mergekit_dam.training.data import Batch, Example, scored_positions

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


class Cached:
    """Expert i's logits at the scored tokens of its training sequences (the answers; every
    token of plain text), computed once before training and kept on the CPU in the dtype
    they come in: the online teacher's targets, up to the rounding of another batch
    shape, without an expert forward per step. Positions the loss does not score are zeros."""

    def __init__(self, logits: Logits, settings, device: torch.device):
        self.logits, self.device = logits, device
        self.cache: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]] = {}  # (expert, sequence) -> positions, [n, V]

    def prepare(self, index: int, batches: Iterable[Batch]) -> None:
        with torch.no_grad():
            for batch in batches:
                logits = self.logits(index, batch)
                for row, sequence in enumerate(batch.sequences):
                    positions = batch.loss_mask[row].cpu().nonzero()[:, 0]
                    self.cache[index, sequence] = (positions, logits[row, positions.to(logits.device)].cpu())

    def target(self, index: int, batch: Batch) -> dict:
        entries = [self.cache[index, sequence] for sequence in batch.sequences]
        values = entries[0][1]
        teacher = torch.zeros(*batch.ids.shape, values.shape[-1], dtype=values.dtype)
        for (row, start), (positions, logits) in zip(batch.places, entries):
            teacher[row, start + positions] = logits
        return {"teacher": teacher.to(self.device)}


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
        """The cached entries of the batch's sequences as [rows, width, K], each at its
        place; padding positions hold zeros, which the mask excludes."""
        entries = [self.cache[index, sequence] for sequence in batch.sequences]
        k = entries[0][0].shape[-1]
        values = torch.zeros(*batch.ids.shape, k)
        indices = torch.zeros(*batch.ids.shape, k, dtype=torch.long)
        for (row, start), (v, i) in zip(batch.places, entries):
            values[row, start : start + len(v)] = v
            indices[row, start : start + len(i)] = i
        return {"topk": (values.to(self.device), indices.to(self.device))}


TEACHERS = {"online": Online, "cached": Cached, "topk": TopK}


def cache_bytes(train: Mapping[int, Sequence[Example]], vocab: int, dtype: torch.dtype) -> int:
    """What `Cached` keeps for these training sets: one row of logits per scored token."""
    scored = sum(sum(scored_positions(e)) for examples in train.values() for e in examples)
    return scored * vocab * (torch.finfo(dtype).bits // 8)


def make_teacher(settings, logits: Logits, device: torch.device):
    """The teacher `settings.teacher` names (made concrete by auto.teacher first)."""
    return TEACHERS[settings.teacher](logits, settings, device)
