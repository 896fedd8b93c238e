"""`packing: auto`: several short examples in one row of a training micro-batch.

Padded together, a micro-batch of short examples computes mostly padding: every row is as
long as the longest example of any expert (on the merge lab, 45 positions for a mean of 15
real tokens). Packed, each expert's examples share rows, each example keeps its own
positions (position ids restart at 0), and the stock model's mask keeps them apart: it
builds a block-diagonal causal mask from the position ids when it gets no attention mask
(transformers' packed-sequence format). So every example's logits are what they are
alone, the KL is taken on the same tokens, and only the padding is gone.

A model whose forward does not keep packed examples apart would see its neighbours, so
`check` compares packed and padded logits on a few real examples before training packs,
and training pads when they differ (logged).
"""

from __future__ import annotations

import logging
from typing import Callable, List, Sequence, Tuple

import torch

from mergekit_dam.training.data import (
    Batch,
    Example,
    scored_positions,
)

LOG = logging.getLogger("mergekit_dam")

# pack only when padding would be at least this share of a padded micro-batch's positions
WORTH_PACKING = 0.2


def layout(lengths: Sequence[int], width: int) -> List[Tuple[int, int]]:
    """(row, start) of each length in rows of `width`: first fit, longest first (ties in
    order), so the layout is a function of the lengths alone."""
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    places: List[Tuple[int, int]] = [(0, 0)] * len(lengths)
    used: List[int] = []
    for k in order:
        row = next((r for r, filled in enumerate(used) if filled + lengths[k] <= width), len(used))
        if row == len(used):
            used.append(0)
        places[k] = (row, used[row])
        used[row] += lengths[k]
    return places


def pack(examples: Sequence[Example], sequences: Sequence[int], width: int, pad_id: int) -> Batch:
    """`examples` (their indices `sequences`) packed into rows of `width` tokens (at least
    the longest): ids, a mask of 1 on real tokens, the loss mask, position ids that restart
    at each example (padding at a row's end counts from 0 as one more, unscored example)
    and each example's (row, start)."""
    width = max(width, max(len(e) for e in examples))
    places = layout([len(e) for e in examples], width)
    rows = 1 + max(row for row, _ in places)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    loss_mask = torch.zeros((rows, width), dtype=torch.long)
    positions = torch.zeros((rows, width), dtype=torch.long)
    ends = [0] * rows
    for example, (row, start) in zip(examples, places):
        span = slice(start, start + len(example))
        ids[row, span] = torch.tensor(example.ids, dtype=torch.long)
        mask[row, span] = 1
        loss_mask[row, span] = torch.tensor(scored_positions(example), dtype=torch.long)
        positions[row, span] = torch.arange(len(example))
        ends[row] = max(ends[row], span.stop)
    for row, end in enumerate(ends):
        positions[row, end:] = torch.arange(width - end)
    return Batch(list(sequences), ids, mask, loss_mask, position_ids=positions, places=places)


def worth_packing(train: dict) -> bool:
    """Whether padding would be a large share of a padded micro-batch: the examples' mean
    length against the longest's."""
    lengths = [len(example) for examples in train.values() for example in examples]
    return 1 - sum(lengths) / len(lengths) / max(lengths) >= WORTH_PACKING


def check(logits: Callable[[Batch], torch.Tensor], examples: Sequence[Example], pad_id: int) -> Tuple[bool, float]:
    """(whether packed logits equal padded ones, the largest difference) for a few of
    `examples` (the three shortest, in one packed row), on `logits`' model. Equal means
    within the rounding of another batch shape, far below what a neighbour changes."""
    picks = sorted(range(len(examples)), key=lambda k: len(examples[k]))[:3]
    chosen = [examples[k] for k in picks]
    if len(chosen) < 2:
        return True, 0.0
    padded = Batch.of(examples, picks, pad_id)
    packed = pack(chosen, picks, sum(len(e) for e in chosen), pad_id)
    with torch.no_grad():
        plain, together = logits(padded), logits(packed)
    exact = plain.dtype == together.dtype == torch.float32
    plain, together = plain.float(), together.float()
    difference = 0.0
    for k, (example, (row, start)) in enumerate(zip(chosen, packed.places)):
        mine = together[row, start : start + len(example)].to(plain.device)
        difference = max(difference, float((plain[k, : len(example)] - mine).abs().max()))
    scale = float(plain.abs().max())
    tolerance = (1e-3 if exact else 3e-2) * max(1.0, scale)
    return difference <= tolerance, difference


def pack_experts(groups: Sequence[Tuple[Sequence[Example], Sequence[int]]], pad_id: int) -> Tuple[Batch, List[Tuple[int, int]]]:
    """One micro-batch from each expert's (examples, their indices), each expert packed into
    its own rows, all rows as wide as the longest example: (the batch, each expert's rows
    as [begin, end))."""
    width = max(len(example) for examples, _ in groups for example in examples)
    parts = [pack(examples, sequences, width, pad_id) for examples, sequences in groups]
    bounds, begin = [], 0
    for part in parts:
        bounds.append((begin, begin + part.ids.shape[0]))
        begin += part.ids.shape[0]
    batch = Batch([k for part in parts for k in part.sequences],
                  *(torch.cat([getattr(part, name) for part in parts]) for name in ("ids", "mask", "loss_mask")),
                  position_ids=torch.cat([part.position_ids for part in parts]),
                  places=[(row + first, start) for part, (first, _) in zip(parts, bounds) for row, start in part.places])
    return batch, bounds
