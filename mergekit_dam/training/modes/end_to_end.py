"""`mode: end_to_end`: the temperature KL to each expert's logits, through the whole
merged model, one stage. One optimizer step = `grad_accum` micro-batches; a micro-batch
holds `batch_size` sequences of every expert that has data, all through ONE merged
forward. Expert i's logits come from the teacher (teachers.py). Sharded (torchrun), the
micro-batches are split across the ranks (distributed.py). Data order is a function of
(seed, step), so a run resumed from a checkpoint ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Sequence

from mergekit_dam.core import auto
from mergekit_dam.core.artifact import sidecar
from mergekit_dam.core.errors import DamError
from mergekit_dam.training import distributed, objective, packing
from mergekit_dam.training.checkpoint import Checkpoints
from mergekit_dam.training.conflicts import conflict_line, held_back
from mergekit_dam.training.data import (
    Batch,
    ExpertData,
    batch_indices,
    collate_examples,
    prepare_data,
)
from mergekit_dam.training.device import dtype_name, peak_memory, start_run
from mergekit_dam.training.estimate import check_memory
from mergekit_dam.training.evaluate import held_out_kl
from mergekit_dam.training.experts import build_view
from mergekit_dam.training.job import TrainingJob, TrainingReport, TrainingResult
from mergekit_dam.training.loop import Problem, fit
from mergekit_dam.training.lr_probe import choose_lr, probe_steps
from mergekit_dam.training.merged_model import MergedModel
from mergekit_dam.training.progress import progress_bar
from mergekit_dam.training.selection import (
    KeepBest,
    evaluation_interval,
    validation_chart,
)
from mergekit_dam.training.teachers import cache_bytes, make_teacher

LOG = logging.getLogger("mergekit_dam")


def run(job: TrainingJob, key: str, artifact_path: str) -> TrainingResult:
    """Set up, train, and measure one end-to-end run (the recipe below)."""
    recipe = EndToEnd(job, key, artifact_path)
    return recipe.result(recipe.train())


class EndToEnd:
    """One end-to-end run, as a recipe: setup (device, data, the merged view, every `auto`
    made concrete, the teacher, validation and checkpoints), `train` (the lr probe, then the
    loop), `result` (the final measures and the report). `settings` are the job's with
    every choice made so far."""

    def __init__(self, job: TrainingJob, key: str, artifact_path: str):
        self.artifact_path, self.ranks = artifact_path, _join(job.settings)
        self.device = self.ranks.device if self.ranks else auto.device(job.settings.train_device)
        self.dtype, self.started = start_run(job.settings, self.device)
        self.data = data = prepare_data(job)
        self.resolved = auto.Resolved(parametrization=job.settings.parametrization, train_device=self.device, train_dtype=self.dtype)
        self.resolved["batch_size"] = auto.batch_size(job.settings, data.train_lengths())
        cache_size = cache_bytes(data.train, job.out_config.vocab_size, self.dtype)
        self.resolved["teacher"] = auto.teacher(job.settings, cache_size)
        self.job = job = replace(job, settings=self.resolved.settings(job.settings))
        self.settings = settings = job.settings
        self.view = build_view(job, self.device, self.dtype, self.ranks)
        self.raw, self.steps = self.view.raw_parameters(), data.steps(settings)
        self.plan = check_memory(job, data, self.view, self.device, self.dtype, self.steps, self.ranks,
                                 cache_size if settings.teacher == "cached" else 0)
        self.resolved["recompute"] = self.view.recompute
        # forwards without gradients take as many sequences as a training micro-batch holds
        # (batch_size per expert), in fewer, larger batches: less memory than a training step
        # keeps, and far fewer launches per evaluation
        self.no_grad_batch = settings.batch_size * len(data.experts)
        self.teacher = make_teacher(settings, self.expert_logits, self.device)
        for index, batches in data.chunks("train", self.no_grad_batch).items():
            self.teacher.prepare(index, batches)
        self.resolved["packing"] = self.packed = _packs(settings, data, self.expert_logits, self.device)
        self.held_out = self.kl_on("held_out")
        self.select = KeepBest(self.raw, self.kl_on("validation"), every=evaluation_interval(settings.eval_every, self.steps),
                               steps=self.steps, patience=settings.patience, max_minutes=settings.max_minutes,
                               keep_best=settings.keep_best)
        self.checkpoints = Checkpoints(artifact_path, key, self.raw, bool(settings.checkpoint_every or settings.checkpoint_minutes),
                                       self.steps, self.select)
        # the experts' KLs are balanced (`balance`); the retain data's (the base's row) counts retain_weight times
        self.retain = next((slot for slot, i in enumerate(data.experts) if job.rows[i] == job.retain_row), None)
        self.probe, self.probe_tokens, self.clock = None, 0, time.perf_counter()

    def expert_logits(self, index: int, batch: Batch):
        return self.view.expert_logits(index, **batch.inputs(self.device))

    def kl_on(self, split: str) -> Callable[[], Dict[str, float]]:
        """The KL per expert row on `split`, packed like training (a validation pass runs at every evaluation)."""
        pack = (lambda examples, sequences: packing.pack(examples, sequences, 0, self.data.pad_id)) if self.packed else None
        batches = self.data.chunks(split, self.no_grad_batch, pack)

        def measure() -> Dict[str, float]:
            return held_out_kl(self.job.rows, batches, lambda b: self.view.merged_logits(**b.inputs(self.device))[0],
                               self.expert_logits, self.settings.temperature, self.device)

        return measure

    def micro_batch(self, step: int, micro: int) -> tuple:
        settings = self.settings
        batch, bounds = _micro_batch(self.data, settings, step * settings.grad_accum + micro, self.packed)
        loss, kls = micro_batch_loss(self.view, self.data.experts, batch, self.teacher, settings, self.device, self.retain, bounds)
        return loss, batch.mask.sum(), {self.job.rows[i]: kl for i, kl in kls.items()}

    def _probe_lr(self) -> float:
        """`lr: auto`'s probe, continuing from the scores a stopped run kept in the checkpoint."""
        quiet = self.job.quiet or not distributed.is_main()
        known = self.checkpoints.probe_state = self.checkpoints.probe()
        if known:
            LOG.info("dam: lr probe: %d rates already measured (%s)", len(known["scores"]), self.checkpoints.path)
        chosen, self.probe, self.probe_tokens = choose_lr(Problem(list(self.raw.values()), probe_steps(self.steps), self.micro_batch),
                                                          self.settings, self.kl_on("validation"), ranks=self.ranks, quiet=quiet,
                                                          known=known, record=self.checkpoints.save_probe,
                                                          budget_minutes=self.settings.max_minutes)
        return chosen

    def _begin(self, optimizer):
        resumed = self.checkpoints.begin(optimizer, self.held_out)
        if not resumed:
            self.select.measure(0)  # the linear start: the coefficients to beat
        self.clock = time.perf_counter()  # tokens/s counts training, not the step-0 evaluations
        return resumed

    def train(self) -> List[dict]:
        """The lr probe (`lr: auto`), then the steps; the history of the steps run here."""
        self.resolved["lr"] = auto.lr(self.settings, self._probe_lr)
        self.settings = self.resolved.settings(self.settings)
        progress = progress_bar(self.steps, "DAM training", self.job.quiet or not distributed.is_main())
        history = fit(Problem(list(self.raw.values()), self.steps, self.micro_batch), self.settings, progress, ranks=self.ranks,
                      begin=self._begin, save=self.checkpoints.save, log_eta=True, select=self.select)
        progress.close()
        if distributed.is_main():
            validation_chart(self.select.report(), sidecar(self.artifact_path, "validation_chart"))
        return history

    def result(self, history: List[dict]) -> TrainingResult:
        """The coefficients kept, the final held-out and training-sample KL, and the report."""
        coefficients, kl_start, kl_end = self.view.tables(), self.checkpoints.kl_start, self.held_out()
        kl_fit = self.kl_on("train_sample")()  # the same measure on examples trained on: the gap is what did not generalise
        settings, ranks = self.settings, self.ranks
        report = TrainingReport(
            mode="end_to_end", steps=self.steps, device=str(self.device), processes=ranks.world if ranks else 1,
            dtype=dtype_name(self.dtype), seconds=time.perf_counter() - self.started,
            tokens_per_second=_tokens_per_second(history[self.checkpoints.first_step:], self.clock),
            peak_memory_bytes=peak_memory(self.device), trainable_coefficients=sum(p.numel() for p in self.raw.values()),
            held_out_kl={"step_0_linear_average": kl_start, "final": kl_end}, training_kl=kl_fit, loss_curve=_curve(history),
            estimate=self.plan, validation=self.select.report(), lr=settings.lr, lr_probe=self.probe, teacher=settings.teacher,
            packing=self.packed, tokens=sum(entry.get("tokens", 0) for entry in history) + self.probe_tokens,
            answers=self.data.answered, resolved=self.resolved.report(), held_back=held_back(kl_start, kl_fit, self.job.retain_row),
        )
        self.checkpoints.remove()
        LOG.info("dam: trained in %.1f s; held-out KL per expert, linear average -> DAM (DAM on as many training examples): %s",
                 report.seconds, {row: f"{kl_start[row]:.4f} -> {kl_end[row]:.4f} ({kl_fit[row]:.4f})" for row in kl_end})
        conflict = conflict_line(kl_start, kl_fit, settings.granularity, self.job.retain_row)
        if conflict and distributed.is_main():
            LOG.warning("%s", conflict)
        return TrainingResult(coefficients, report)


def _join(settings):
    """The process group of a torchrun launch (None in a plain process), after checking
    that each step's micro-batches split evenly across its processes."""
    world = distributed.world_size()
    if settings.grad_accum % world:
        raise DamError(
            f"dam: sharded training splits each step's grad_accum micro-batches across the {world} processes; "
            f"set grad_accum to a multiple of {world} (now {settings.grad_accum})"
        )
    return distributed.setup(settings.train_device)


def _packs(settings, data: ExpertData, expert_logits, device) -> bool:
    """Whether training packs its micro-batches (auto.packing decides), checking on one
    expert's model, on examples of every expert (so at least two when anything packs),
    that packed logits equal padded ones."""
    first = data.experts[0]
    examples = [example for i in data.experts for example in data.train[i]]
    return auto.packing(settings.packing, packing.worth_packing(data.train), device,
                        lambda: packing.check(lambda batch: expert_logits(first, batch), examples, data.pad_id))


def _micro_batch(data: ExpertData, settings, micro_step: int, packed: bool = False) -> tuple:
    """(`batch_size` sequences of every expert with data, expert by expert, padded together
    or packed; each expert's rows as [begin, end))."""
    groups = []
    for i in data.experts:
        sequences = batch_indices(len(data.train[i]), settings.batch_size, micro_step, settings.seed, i)
        groups.append(([data.train[i][k] for k in sequences], sequences))
    if packed:
        return packing.pack_experts(groups, data.pad_id)
    size = settings.batch_size
    batch = Batch([k for _, sequences in groups for k in sequences],
                  *collate_examples([example for examples, _ in groups for example in examples], data.pad_id))
    return batch, [(slot * size, (slot + 1) * size) for slot in range(len(groups))]


def micro_batch_loss(view: MergedModel, experts: Sequence[int], batch: Batch, teacher, settings, device,
                     retain: Optional[int] = None, bounds: Optional[Sequence[tuple]] = None) -> tuple:
    """(loss, {expert index: KL}) of one micro-batch (each expert's rows in `experts` order,
    as [begin, end) in `bounds`; default `batch_size` rows each): one merged forward for all
    rows, each expert's rows against its teacher. The experts' losses are summed as
    `balance` weighs them; the one in slot `retain` (the retain data) adds retain_weight times its own."""
    bounds = bounds or [(slot * settings.batch_size, (slot + 1) * settings.batch_size) for slot in range(len(experts))]
    student, tables = view.merged_logits(**batch.inputs(device))
    kls, losses, kept = {}, [], 0
    for slot, (index, (begin, end)) in enumerate(zip(experts, bounds)):
        part = batch.rows(begin, end, device)
        expert_loss, kls[index] = objective.expert_loss(student[begin:end], part.loss_mask, settings, **teacher.target(index, part))
        if slot == retain:
            kept = settings.retain_weight * expert_loss
        else:
            losses.append(expert_loss)
    return objective.regularisers(tables.values(), settings) + objective.balanced(losses, settings.balance) + kept, kls


def _curve(history: List[dict]) -> List[dict]:
    return [{k: entry[k] for k in ("stage", "step", "loss", "kl") if k in entry} for entry in history]


def _tokens_per_second(history: List[dict], clock: float) -> float:
    return sum(entry.get("tokens", 0) for entry in history) / max(time.perf_counter() - clock, 1e-9)
