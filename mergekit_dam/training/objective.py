"""DAM's training objective, as pure functions of logits and coefficients.

loss = sum_i w_i KL_T(expert_i || merged) on expert i's tokens    (distillation; w_i: `balance`)
     + similarity_weight * mean pairwise cosine of the experts' coefficient vectors
     + l1_weight * ||c||_1 + l2_weight * ||c||_2                  (norms, not squared)
     + entropy_weight * entropy of the merged predictions
     + mse_weight * mean squared error between merged and expert logits
KL terms use softmax(logits / T), are scaled by T^2 and averaged over non-padding tokens.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per token over the vocabulary, masked mean, times T^2.

    student, teacher: [B, L, V] logits; mask: [B, L] with 1 on real tokens.
    """
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_token = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


def topk_kl_divergence(
    student: torch.Tensor, teacher_log_probs: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL against a cached top-K teacher, over K + 1 outcomes: the teacher's K tokens
    and one "everything else" bucket. `teacher_log_probs` are log softmax(logits / T)
    over the full vocabulary at those indices, so the bucket carries the teacher's tail
    mass and the student is penalised for mass it puts outside the K (renormalising over
    the K alone would not). With K = V this is exactly the full KL.
    """
    log_student = F.log_softmax(student.float() / temperature, dim=-1).gather(-1, indices)
    log_teacher = teacher_log_probs.float()

    def with_tail(log_p: torch.Tensor) -> torch.Tensor:
        tail = (1 - log_p.exp().sum(-1, keepdim=True)).clamp_min(1e-12).log()
        return torch.cat([log_p, tail], dim=-1)

    log_student, log_teacher = with_tail(log_student), with_tail(log_teacher)
    teacher_p = log_teacher.exp()
    per_token = (teacher_p * (log_teacher - log_student)).where(teacher_p > 1e-12, 0.0).sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


def entropy(student: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p = F.log_softmax(student.float() / temperature, dim=-1)
    return _masked_mean(-(log_p.exp() * log_p).sum(-1), mask)


def logit_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _masked_mean((student.float() - teacher.float()).pow(2).mean(-1), mask)


def cosine_similarity(coefficients: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean over tensors of the mean over model pairs of cos(c_a, c_b); tensors are [N, D].
    Tensors of one shape are stacked and computed together (a few kernels per shape, not
    per tensor: what a step launches on a GPU counts)."""
    by_shape: dict = {}
    for table in coefficients:
        if table.shape[0] > 1:
            by_shape.setdefault(tuple(table.shape), []).append(table)
    if not by_shape:
        return torch.zeros(())
    total, count = 0, 0
    for (n, _), tables in by_shape.items():
        first, second = (list(side) for side in zip(*itertools.combinations(range(n), 2)))
        stacked = torch.stack(tables)  # [T, N, D]
        total = total + F.cosine_similarity(stacked[:, first], stacked[:, second], dim=-1).mean(-1).sum()
        count += len(tables)
    return total / count


def coefficient_norms(coefficients: Iterable[torch.Tensor]) -> tuple:
    """(L1 norm, L2 norm) of all coefficients together."""
    flat = torch.cat([table.reshape(-1) for table in coefficients])
    return flat.abs().sum(), flat.pow(2).sum().sqrt()


def regularisers(coefficients, settings) -> torch.Tensor:
    coefficients = list(coefficients)
    total = settings.similarity_weight * cosine_similarity(coefficients)
    if settings.l1_weight or settings.l2_weight:
        l1, l2 = coefficient_norms(coefficients)
        total = total + settings.l1_weight * l1 + settings.l2_weight * l2
    return total


def balanced(losses: Sequence[torch.Tensor], power: float) -> torch.Tensor:
    """sum_i w_i L_i with w_i = N L_i^p / sum_j L_j^p, the weights not differentiated
    (mean 1, so the loss keeps its scale). p = 0 is the plain sum; p > 0 leans each step
    toward the experts the merge matches worst (at p = 1 the gradient is that of
    sum_i L_i^2 / (2 mean L)), so that a skill already matched does not take the steps
    another still needs."""
    stacked = torch.stack(list(losses))
    if power == 0 or len(losses) < 2:
        return stacked.sum()
    held = stacked.detach().clamp_min(1e-12) ** power
    return (held * (len(losses) / held.sum()) * stacked).sum()


def expert_loss(
    student: torch.Tensor,
    mask: torch.Tensor,
    settings,
    teacher: Optional[torch.Tensor] = None,
    topk: Optional[tuple] = None,
) -> tuple:
    """(loss, KL) for one expert's rows: KL plus the logit-level options."""
    if topk is not None:  # (teacher log-probs at temperature T, their token indices)
        kl = topk_kl_divergence(student, topk[0], topk[1], mask, settings.temperature)
    else:
        kl = kl_divergence(student, teacher, mask, settings.temperature)
    loss = kl
    if settings.entropy_weight:
        loss = loss + settings.entropy_weight * entropy(student, mask, settings.temperature)
    if settings.mse_weight:
        if teacher is None:
            raise ValueError("mse_weight needs full teacher logits (teacher: online)")
        loss = loss + settings.mse_weight * logit_mse(student, teacher, mask)
    return loss, kl
