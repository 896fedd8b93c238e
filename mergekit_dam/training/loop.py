"""The training loop, the one every mode uses: AdamW on one problem's coefficients, the
learning-rate schedule, gradient accumulation (micro-batches split across the ranks when
sharded), the non-finite-loss check, clipping, the history, the progress bar and the
checkpoint hook. What a micro-batch computes is the mode's business (`Problem.micro_batch`)."""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from mergekit_dam.core.errors import DamError
from mergekit_dam.core.settings import DamSettings
from mergekit_dam.training.device import out_of_memory
from mergekit_dam.training.interrupts import Interrupts
from mergekit_dam.training.schedule import lr_factor

LOG = logging.getLogger("mergekit_dam")

# (loss of the micro-batch, its real tokens, KL per expert row name)
MicroBatch = Callable[[int, int], tuple]


@dataclass
class Problem:
    """One optimisation problem: `steps` AdamW steps on `params`. `micro_batch(step, micro)`
    returns (loss, tokens, {row: KL}) for micro-batch `micro` of optimizer step `step`."""

    params: List[torch.nn.Parameter]
    steps: int
    micro_batch: MicroBatch
    name: Optional[str] = None  # the layer-wise stage it is, shown in the history and messages


def fit(problem: Problem, settings: DamSettings, progress, *, ranks=None, begin: Optional[Callable] = None,
        save: Optional[Callable] = None, log_eta: bool = False, select=None) -> List[dict]:
    """Run the problem; returns its history (one entry per step: step, loss, kl, tokens,
    and the layer-wise stage when named). `begin(optimizer)`, once before the first step: (first step,
    history so far) of a resumed run, or None; `save(step, optimizer, history)` every
    `checkpoint_every` steps, every `checkpoint_minutes`, and on SIGINT/SIGTERM before the
    run stops; `ranks`: the process group of a sharded run; `select` (selection.KeepBest):
    validation after each step, early stop, and the best coefficients put back at the end."""
    optimizer = torch.optim.AdamW(problem.params, lr=settings.lr, weight_decay=settings.weight_decay)
    factor = lr_factor(settings, problem.steps)
    first, history = (begin(optimizer) if begin else None) or (0, [])
    progress.update(first)
    clock = last_save = time.perf_counter()
    tokens_seen = 0
    with Interrupts(enabled=save is not None) as interrupts, logging_redirect_tqdm(loggers=_console_loggers()):
        for step in range(first, problem.steps):
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * factor(step)
            timely = bool(settings.checkpoint_minutes) and time.perf_counter() - last_save >= 60 * settings.checkpoint_minutes
            spent = bool(select and select.over_budget())
            try:
                loss, tokens, kls, (timely, stop, spent) = _accumulate(problem, settings, step, ranks,
                                                                       (timely, interrupts.signal is not None, spent))
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)  # the coefficients are still those after `step` steps
                saved = bool(save) and step > first and not ranks  # sharded, the other ranks may not get here
                if saved:
                    save(step, optimizer, history)
                raise out_of_memory(problem.params[0].device, settings, f"at step {step + 1}" + (f" of stage {problem.name}" if problem.name else ""),
                                    checkpoint=saved) from None
            _step(problem, settings, optimizer, step, loss)
            history.append({**({"stage": problem.name} if problem.name else {}), "step": step + 1, "loss": loss, "kl": kls, "tokens": tokens})
            tokens_seen += tokens
            if log_eta and step == first and problem.steps - first > 1:
                per_step = time.perf_counter() - clock
                LOG.info("dam: first step took %.2f s: about %.1f min for the remaining %d steps",
                         per_step, per_step * (problem.steps - step - 1) / 60, problem.steps - step - 1)
            progress.update(1)
            progress.set_postfix(**({"stage": problem.name} if problem.name else {}), loss=f"{loss:.4f}",
                                 **{f"kl{i}": f"{v:.3f}" for i, v in enumerate(kls.values())},
                                 tok_s=f"{tokens_seen / max(time.perf_counter() - clock, 1e-9):.0f}")
            done = bool(select and select.after_step(step + 1, spent))
            due = settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0
            if save and (due or timely or stop) and step + 1 < problem.steps and not done:
                save(step + 1, optimizer, history)
                last_save = time.perf_counter()
                if stop:
                    interrupts.stop(step + 1)
            if done:
                break
    if select:
        select.finish()
    return history


def _console_loggers() -> List[logging.Logger]:
    """The loggers whose own handlers print to the terminal (mergekit's root handler, or
    ours without one): routed through tqdm while a bar runs, so that log lines print
    above the bar instead of into it. Only those: a logger without a handler of its own
    reaches the terminal through its parent's."""
    def prints(logger):
        return any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr) for h in logger.handlers)

    return [logger for logger in (logging.getLogger(), LOG) if prints(logger)]


def _step(problem: Problem, settings: DamSettings, optimizer, step: int, loss: float) -> None:
    """The optimizer step, after the non-finite check and clipping."""
    _check_finite(loss, step, problem.name, settings)
    if settings.grad_clip:
        torch.nn.utils.clip_grad_norm_(problem.params, settings.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _accumulate(problem: Problem, settings: DamSettings, step: int, ranks, flags: tuple) -> tuple:
    """Forward and backward of this rank's micro-batches of `step`: (mean loss, tokens,
    mean KL per row, flags) over all ranks. The loss is scaled so that the gradient is the
    mean over the step's micro-batches (FSDP averages over the ranks), and the figures stay
    on the device until the step ends: one host sync per step. `flags` (checkpoint due,
    stop asked) travel in the same reduction, so every rank agrees on them."""
    world, rank = (ranks.world, ranks.rank) if ranks else (1, 0)
    sums: Optional[torch.Tensor] = None
    names: List[str] = []
    for micro in range(settings.grad_accum):
        if micro % world != rank:
            continue  # another process's micro-batch
        loss, tokens, kls = problem.micro_batch(step, micro)
        names = list(kls)
        values = torch.stack([loss.detach().double(), torch.as_tensor(tokens, device=loss.device).double(), *[kl.detach().double() for kl in kls.values()]])
        sums = values if sums is None else sums + values
        (loss * world / settings.grad_accum).backward()
        del loss
    sums = torch.cat([sums, torch.tensor([float(flag) for flag in flags], dtype=sums.dtype, device=sums.device)])
    if ranks:
        sums = ranks.sum(sums)
    sums = sums.cpu()
    kls: Dict[str, float] = {name: float(value) / settings.grad_accum for name, value in zip(names, sums[2 : 2 + len(names)])}
    return float(sums[0]) / settings.grad_accum, int(sums[1]), kls, tuple(bool(value > 0) for value in sums[2 + len(names) :])


class NonFiniteLoss(DamError):
    """The training loss became inf or nan."""


def _check_finite(loss: float, step: int, stage: Optional[str], settings: DamSettings) -> None:
    if not math.isfinite(loss):
        where = f" of stage {stage}" if stage else ""
        raise NonFiniteLoss(
            f"dam: the training loss became {loss} at step {step + 1}{where}; lower `lr` "
            f"(now {settings.lr}) or `temperature`, or check the data"
        )
