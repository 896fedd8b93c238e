"""The held-out evaluation of every mode: KL_T(expert i || merged) on expert i's
held-out batches, the figure the report shows at step 0 (the linear average) and at the end."""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch

from mergekit_dam.training import objective
from mergekit_dam.training.data import Batch


def held_out_kl(
    rows: Sequence[str],
    batches: Dict[int, List[Batch]],
    student: Callable[[Batch], torch.Tensor],
    teacher: Callable[[int, Batch], torch.Tensor],
    temperature: float,
    device: torch.device,
) -> Dict[str, float]:
    """Per expert row name: the row-weighted mean over its batches of the masked KL."""
    result = {}
    with torch.no_grad():
        for index, chunks in batches.items():
            total, count = 0.0, 0
            for batch in chunks:
                mask = batch.loss_mask.to(device)  # the answer tokens (every token for plain text)
                kl = objective.kl_divergence(student(batch), teacher(index, batch), mask, temperature)
                total += kl.item() * len(mask)
                count += len(mask)
            result[rows[index]] = total / count
    return result
