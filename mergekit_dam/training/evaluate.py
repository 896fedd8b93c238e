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
    """Per expert row name: the mean over its scored tokens of the KL, every token counted
    once whatever the batching. The sums stay on the device: one host sync per call."""
    sums = {}
    with torch.no_grad():
        for index, chunks in batches.items():
            total, count = torch.zeros((), dtype=torch.float64, device=device), 0
            for batch in chunks:
                tokens = int(batch.loss_mask.sum())  # the answer tokens (every token for plain text); a CPU tensor
                kl = objective.kl_divergence(student(batch), teacher(index, batch), batch.loss_mask.to(device), temperature)
                total += kl.double() * tokens
                count += tokens
            sums[rows[index]] = (total, count)
    return {row: float(total) / max(count, 1) for row, (total, count) in sums.items()}
