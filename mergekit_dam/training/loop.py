"""The training loop, the one every mode uses: AdamW on a stage's coefficients, the
learning-rate schedule, gradient accumulation (micro-batches split across the ranks when
sharded), the non-finite-loss check, clipping, the history, the progress bar and the
checkpoint hook. What a micro-batch computes is the mode's business (`Stage.micro_batch`)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from mergekit_dam.plugin.config import DamError, DamSettings
from mergekit_dam.training.schedule import lr_factor

LOG = logging.getLogger("mergekit_dam")

# (loss of the micro-batch, its real tokens, KL per expert row name)
MicroBatch = Callable[[int, int], tuple]


@dataclass
class Stage:
    """One optimisation problem: `steps` AdamW steps on `params`. `micro_batch(step, micro)`
    returns (loss, tokens, {row: KL}) for micro-batch `micro` of optimizer step `step`."""

    params: List[torch.nn.Parameter]
    steps: int
    micro_batch: MicroBatch
    name: Optional[str] = None  # shown in the history and messages of multi-stage modes


def fit(stage: Stage, settings: DamSettings, progress, *, ranks=None, begin: Optional[Callable] = None,
        save: Optional[Callable] = None, log_eta: bool = False) -> List[dict]:
    """Run the stage; returns its history (one entry per step: step, loss, kl, tokens,
    and stage when named). `begin(optimizer)`, once before the first step: (first step,
    history so far) of a resumed run, or None; `save(step, optimizer, history)` every
    `checkpoint_every` steps; `ranks`: the process group of a sharded run."""
    optimizer = torch.optim.AdamW(stage.params, lr=settings.lr, weight_decay=settings.weight_decay)
    factor = lr_factor(settings, stage.steps)
    first, history = (begin(optimizer) if begin else None) or (0, [])
    progress.update(first)
    clock = time.perf_counter()
    tokens_seen = 0
    for step in range(first, stage.steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * factor(step)
        loss, tokens, kls = _accumulate(stage, settings, step, ranks)
        _check_finite(loss, step, stage.name, settings)
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(stage.params, settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({**({"stage": stage.name} if stage.name else {}), "step": step + 1, "loss": loss, "kl": kls, "tokens": tokens})
        tokens_seen += tokens
        if log_eta and step == first and stage.steps - first > 1:
            per_step = time.perf_counter() - clock
            LOG.info("dam: first step took %.2f s: about %.1f min for the remaining %d steps",
                     per_step, per_step * (stage.steps - step - 1) / 60, stage.steps - step - 1)
        progress.update(1)
        progress.set_postfix(**({"stage": stage.name} if stage.name else {}), loss=f"{loss:.4f}",
                             **{f"kl{i}": f"{v:.3f}" for i, v in enumerate(kls.values())},
                             tok_s=f"{tokens_seen / max(time.perf_counter() - clock, 1e-9):.0f}")
        if save and settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0 and step + 1 < stage.steps:
            save(step + 1, optimizer, history)
    return history


def _accumulate(stage: Stage, settings: DamSettings, step: int, ranks) -> tuple:
    """Forward and backward of this rank's micro-batches of `step`: (mean loss, tokens,
    mean KL per row) over all ranks. The loss is scaled so that the gradient is the mean
    over the step's micro-batches (FSDP averages over the ranks), and the figures stay
    on the device until the step ends: one host sync per step."""
    world, rank = (ranks.world, ranks.rank) if ranks else (1, 0)
    sums: Optional[torch.Tensor] = None
    names: List[str] = []
    for micro in range(settings.grad_accum):
        if micro % world != rank:
            continue  # another process's micro-batch
        loss, tokens, kls = stage.micro_batch(step, micro)
        names = list(kls)
        values = torch.stack([loss.detach().double(), torch.as_tensor(tokens, device=loss.device).double(), *[kl.detach().double() for kl in kls.values()]])
        sums = values if sums is None else sums + values
        (loss * world / settings.grad_accum).backward()
        del loss
    if ranks:
        sums = ranks.sum(sums)
    sums = sums.cpu()
    kls: Dict[str, float] = {name: float(value) / settings.grad_accum for name, value in zip(names, sums[2:])}
    return float(sums[0]) / settings.grad_accum, int(sums[1]), kls


def _check_finite(loss: float, step: int, stage: Optional[str], settings: DamSettings) -> None:
    if not math.isfinite(loss):
        where = f" of stage {stage}" if stage else ""
        raise DamError(
            f"dam: the training loss became {loss} at step {step + 1}{where}; lower `lr` "
            f"(now {settings.lr}) or `temperature`, or check the data"
        )
