"""`mode: layerwise`: the coefficients of one group at a time, on cached hidden states,
for a device that cannot hold N experts of the whole model.

Stages, in the order the model computes (each `steps` optimizer steps of its own):
  embed    the input embedding's coefficients; target: each expert's embedding output.
  layer b  (b < L-1) layer b's coefficients. Input: the merged model's hidden states
           before layer b on expert i's data, cached from the stages already trained;
           target: expert i's own hidden states after layer b (its own trajectory, so a
           stage also corrects what the earlier merged layers got wrong).
  last     layer L-1 and the head (final norm, lm_head) together, with the end-to-end
           objective: temperature KL to expert i's teacher (online logits, or top-K
           cached before the stage), computed from expert i's own cached hidden states.
Intermediate losses are the relative squared error sum_i |h - h_i|^2 / |h_i|^2 (masked
token means), plus the regularisers of that stage's coefficients (the cosine term is
then a mean over the stage's tensors rather than over all tensors).

How this differs from end-to-end: a layer is fitted to reproduce expert hidden states
given the merged prefix, not to minimise the final KL, and earlier layers never see
the gradient of later ones. Only the last stage optimises the logit objective.

Memory: one group's experts (N x one layer; the embedding stays for tied lm_heads) plus
one layer's activations on the device; the hidden-state caches (2 per training token,
3 per held-out token, x hidden size) stay on the CPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional

import torch

from mergekit_dam.core import auto
from mergekit_dam.core.errors import DamError
from mergekit_dam.training import distributed, objective
from mergekit_dam.training.data import Batch, batch_indices, prepare_data
from mergekit_dam.training.device import dtype_name, peak_memory, start_run
from mergekit_dam.training.evaluate import held_out_kl
from mergekit_dam.training.experts import build_view
from mergekit_dam.training.job import TrainingJob, TrainingReport, TrainingResult
from mergekit_dam.training.loop import Problem, fit
from mergekit_dam.training.progress import progress_bar
from mergekit_dam.training.teachers import cache_bytes, make_teacher

LOG = logging.getLogger("mergekit_dam")


@dataclass
class Chunk(Batch):
    """A batch of one expert with its cached hidden states (CPU), as the stages advance."""

    expert: Optional[torch.Tensor] = None  # the expert's own hidden states entering the current layer
    merged: Optional[torch.Tensor] = None  # the merged prefix's hidden states entering it
    linear: Optional[torch.Tensor] = None  # equal coefficients' (held-out chunks only)
    target: Optional[torch.Tensor] = None  # the expert's hidden states after the current layer


def relative_error(student: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked token mean of |student - target|^2 over masked token mean of |target|^2."""
    weight = mask.to(torch.float32)
    error = ((student.float() - target.float()).pow(2).sum(-1) * weight).sum()
    scale = (target.float().pow(2).sum(-1) * weight).sum().clamp_min(1e-12)
    return error / scale


def run(job: TrainingJob, key: str, artifact_path: str) -> TrainingResult:
    if distributed.world_size() > 1:
        raise DamError("dam: mode: layerwise runs in one process; launch it without torchrun, or use mode: end_to_end")
    device = auto.device(job.settings.train_device)
    dtype, started = start_run(job.settings, device)
    resolved = auto.Resolved(parametrization=job.settings.parametrization, train_device=device, train_dtype=dtype, packing=False,
                             lr=auto.lr(job.settings))  # no validation KL to probe against: auto.LAYERWISE_LR
    run = LayerwiseRun(job, device, dtype, resolved)
    settings = run.settings
    LOG.info("dam: layer-wise training: %d stages of %d steps on %s (%s), inputs %s", run.layers + 1, run.steps, device,
             dtype_name(dtype), job.rows)
    clock = time.perf_counter()
    run.embed_stage()
    for index in range(run.layers - 1):
        run.layer_stage(index)
    kl_start, kl_end = run.last_stage()
    run.progress.close()
    report = TrainingReport(
        mode="layerwise", steps=run.steps, stages=run.layers + 1, device=str(device), processes=1, dtype=dtype_name(dtype),
        seconds=time.perf_counter() - started,
        tokens_per_second=sum(entry["tokens"] for entry in run.history) / max(time.perf_counter() - clock, 1e-9),
        peak_memory_bytes=peak_memory(device),
        trainable_coefficients=sum(t.numel() for name, t in run.tables.items() if name in run.view.trained_names),
        held_out_kl={"step_0_linear_average": kl_start, "final": kl_end},
        loss_curve=[{k: entry[k] for k in ("stage", "step", "loss", "kl")} for entry in run.history], lr=settings.lr, teacher=settings.teacher,
        tokens=sum(entry["tokens"] for entry in run.history), answers=run.answered, resolved=resolved.report(),
    )
    LOG.info("dam: trained layer-wise in %.1f s; held-out KL per expert, linear average -> DAM: %s", report.seconds,
             {row: f"{kl_start[row]:.4f} -> {kl_end[row]:.4f}" for row in kl_end})
    return TrainingResult({name: run.tables[name] for name in sorted(run.tables)}, report)


class LayerwiseRun:
    """The state of one layer-wise run: the lazily loaded view, each expert's training
    chunks and held-out checks with their hidden-state caches, the tables learned so far."""

    def __init__(self, job: TrainingJob, device: torch.device, dtype: torch.dtype, resolved: auto.Resolved):
        data = prepare_data(job)
        resolved["batch_size"] = auto.batch_size(job.settings, data.train_lengths())
        resolved["teacher"] = auto.teacher(job.settings, cache_bytes(data.train, job.out_config.vocab_size, dtype))
        settings = resolved.settings(job.settings)
        self.job = job = replace(job, settings=settings)
        self.settings, self.device = settings, device
        self.experts, self.steps, self.answered = data.experts, data.steps(settings), data.answered

        def chunks(split: str) -> Dict[int, List[Chunk]]:
            return {i: [Chunk(b.sequences, b.ids, b.mask, b.loss_mask) for b in batches] for i, batches in data.chunks(split, self.settings.batch_size).items()}

        self.chunks, self.checks = chunks("train"), chunks("held_out")
        self.view = build_view(job, device, dtype, lazy=True)
        # one layer at a time the memory estimate is one layer's: `auto` keeps activations
        self.view.recompute = resolved["recompute"] = auto.recompute(settings.recompute, False, lambda mode: 0, None)
        self.layers = len(self.view.blocks)
        skeleton = self.view.skeleton
        head = skeleton.get_output_embeddings()
        self.tied = head is not None and head.weight is skeleton.get_input_embeddings().weight
        self.progress = progress_bar(self.steps * (self.layers + 1), "DAM layer-wise", job.quiet)
        self.tables: Dict[str, torch.Tensor] = {}
        self.history: List[dict] = []
        self.linear_embed: Dict[str, torch.Tensor] = {}

    def on(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device)

    def everything(self, index: int) -> List[Chunk]:
        return self.chunks[index] + self.checks[index]

    def fit(self, stage: str, keys: List[str], loss_of: Callable[[int, Chunk], tuple]) -> None:
        """`steps` AdamW steps on the raw coefficients of `keys`' groups; loss_of(expert,
        chunk) -> (loss, KL or None, the stage's trained tables). One chunk per expert per
        micro-batch, in a (seed, step) order."""
        settings = self.settings
        params = [p for key in keys for p in (*self.view.groups[key].coefficients.raw, *self.view.groups[key].coefficients.row_factors)]
        if not params:
            self.progress.update(self.steps)
            return

        def micro_batch(step: int, micro: int) -> tuple:
            losses, tokens, kls = [], 0, {}
            for i in self.experts:
                chunk = self.chunks[i][batch_indices(len(self.chunks[i]), 1, step * settings.grad_accum + micro, settings.seed, i)[0]]
                expert_loss, kl, tables = loss_of(i, chunk)
                losses.append(expert_loss)
                tokens += int(chunk.mask.sum())
                if kl is not None:
                    kls[self.job.rows[i]] = kl
            return objective.balanced(losses, settings.balance) + objective.regularisers(tables.values(), settings), tokens, kls

        self.history += fit(Problem(params, self.steps, micro_batch, stage), settings, self.progress)
        for key in keys:
            self.tables.update(self.view.groups[key].tables())

    def embed_stage(self) -> None:
        view, on = self.view, self.on
        embed = view.load("embed")
        with torch.no_grad():
            self.linear_embed = embed(None)[0]  # equal coefficients: the held-out baseline
            for i in self.experts:
                own = embed(i)[0]
                for chunk in self.everything(i):
                    chunk.expert = view.embedding_output(on(chunk.ids), on(chunk.mask), own).cpu()
                for chunk in self.checks[i]:
                    chunk.linear = view.embedding_output(on(chunk.ids), on(chunk.mask), self.linear_embed).cpu()

        def loss_of(i: int, chunk: Chunk) -> tuple:
            weights, tables = embed(None)
            hidden = view.embedding_output(on(chunk.ids), on(chunk.mask), weights)
            return relative_error(hidden, on(chunk.expert), on(chunk.mask)), None, tables

        self.fit("embed", ["embed"], loss_of)
        with torch.no_grad():
            weights = embed(None)[0]
            for i in self.experts:
                for chunk in self.everything(i):
                    chunk.merged = view.embedding_output(on(chunk.ids), on(chunk.mask), weights).cpu()
        if not self.tied:
            view.unload("embed")
            self.linear_embed = {}

    def layer_stage(self, index: int) -> None:
        view, on, key = self.view, self.on, f"layer{index}"
        view.load(key)
        with torch.no_grad():
            for i in self.experts:
                for chunk in self.everything(i):
                    chunk.target = view.layer_output(index, i, on(chunk.expert), on(chunk.mask))[0].cpu()
                for chunk in self.checks[i]:  # equal coefficients, before training
                    chunk.linear = view.layer_output(index, None, on(chunk.linear), on(chunk.mask))[0].cpu()

        def loss_of(i: int, chunk: Chunk) -> tuple:
            hidden, tables = view.layer_output(index, None, on(chunk.merged), on(chunk.mask))
            return relative_error(hidden, on(chunk.target), on(chunk.mask)), None, tables

        self.fit(key, [key], loss_of)
        with torch.no_grad():
            for i in self.experts:
                for chunk in self.everything(i):
                    chunk.merged = view.layer_output(index, None, on(chunk.merged), on(chunk.mask))[0].cpu()
                    chunk.expert, chunk.target = chunk.target, None
        view.unload(key)

    def logits(self, selection: Optional[int], hidden: torch.Tensor, mask: torch.Tensor) -> tuple:
        """(logits, trained tables) of the last layer and the head from the hidden states
        entering the last layer; merged (None) or expert `selection`'s weights."""
        weights, head_tables = self.view.groups["head"](selection)
        if self.tied:  # the lm_head is the embedding: the expert's own, or the trained merged one, fixed
            embed = self.view.groups["embed"]
            weights.update(embed(selection)[0] if selection is not None else {n: w.detach() for n, w in embed(None)[0].items()})
        logits, layer_tables = self.view.final_logits(selection, hidden, mask, weights)
        return logits, {**head_tables, **layer_tables}

    def last_stage(self) -> tuple:
        """The last layer and the head on the logit objective: (held-out KL of the linear
        average, held-out KL after training) per expert."""
        view, on, settings = self.view, self.on, self.settings
        last = f"layer{self.layers - 1}"
        view.load(last)
        view.load("head")

        def expert_logits(i: int, chunk: Chunk) -> torch.Tensor:
            return self.logits(i, on(chunk.expert), on(chunk.mask))[0]

        def linear_logits(chunk: Chunk) -> torch.Tensor:  # equal coefficients everywhere (last layer and head are still 1/N)
            weights = {**view.groups["head"](None)[0], **self.linear_embed}
            return view.final_logits(None, on(chunk.linear), on(chunk.mask), weights)[0]

        def evaluate(student: Callable[[Chunk], torch.Tensor]) -> Dict[str, float]:
            return held_out_kl(self.job.rows, self.checks, student, expert_logits, settings.temperature, self.device)

        kl_start = evaluate(linear_logits)
        teacher = make_teacher(settings, expert_logits, self.device)
        for i in self.experts:
            teacher.prepare(i, self.chunks[i])

        def loss_of(i: int, chunk: Chunk) -> tuple:
            mask = on(chunk.mask)
            target = teacher.target(i, chunk)
            student, tables = self.logits(None, on(chunk.merged), mask)
            loss, kl = objective.expert_loss(student, on(chunk.loss_mask), settings, **target)
            return loss, kl, tables

        self.fit("last", [last, "head"], loss_of)
        return kl_start, evaluate(lambda chunk: self.logits(None, on(chunk.merged), on(chunk.mask))[0])
