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
from typing import List, Optional, Sequence

from tqdm.auto import tqdm

from mergekit_dam.plugin.config import DamError
from mergekit_dam.training import distributed, objective, packing
from mergekit_dam.training.checkpoint import Checkpoints
from mergekit_dam.training.data import (
    Batch,
    ExpertData,
    batch_indices,
    collate_examples,
    prepare_data,
)
from mergekit_dam.training.device import (
    available_memory,
    dtype_name,
    peak_memory,
    resident_bytes,
    resolve_device,
    start_run,
)
from mergekit_dam.training.estimate import estimate, recompute_mode
from mergekit_dam.training.evaluate import held_out_kl
from mergekit_dam.training.experts import build_view
from mergekit_dam.training.job import TrainingJob, TrainingReport, TrainingResult
from mergekit_dam.training.loop import Stage, fit
from mergekit_dam.training.lr_probe import choose_lr, probe_steps
from mergekit_dam.training.selection import (
    KeepBest,
    evaluation_interval,
    validation_chart,
)
from mergekit_dam.training.teachers import cache_bytes, make_teacher, teacher_name
from mergekit_dam.training.view import MergedModel

LOG = logging.getLogger("mergekit_dam")


def train(job: TrainingJob, key: str, artifact_path: str) -> TrainingResult:
    settings = job.settings
    ranks = _join(settings)
    device = ranks.device if ranks else resolve_device(settings.train_device)
    dtype, started = start_run(settings, device)
    data = prepare_data(job)
    job = replace(job, settings=data.resolve(settings))
    settings = job.settings
    view = build_view(job, device, dtype, ranks)
    raw = view.raw_parameters()
    steps = data.steps(settings)
    cache_size = cache_bytes(data.train, job.out_config.vocab_size, dtype)
    settings = settings.model_copy(update={"teacher": teacher_name(settings, cache_size)})
    plan = _check_memory(job, data, view, device, dtype, steps, ranks, cache_size if settings.teacher == "cached" else 0)

    # forwards without gradients take as many sequences as a training micro-batch holds
    # (batch_size per expert), in fewer, larger batches: less memory than a training step
    # keeps, and far fewer launches per evaluation
    no_grad_batch = settings.batch_size * len(data.experts)

    def expert_logits(index: int, batch: Batch):
        return view.expert_logits(index, **batch.inputs(device))

    teacher = make_teacher(settings, expert_logits, device)
    for index, batches in data.chunks("train", no_grad_batch).items():
        teacher.prepare(index, batches)
    packed = _packs(settings, data, expert_logits, device)

    def kl_on(split: str):  # packed like training: a validation pass runs at every evaluation
        batches = data.chunks(split, no_grad_batch, (lambda examples, sequences: packing.pack(examples, sequences, 0, data.pad_id))
                              if packed else None)
        return lambda: held_out_kl(job.rows, batches, lambda b: view.merged_logits(**b.inputs(device))[0], expert_logits,
                                   settings.temperature, device)

    evaluate = kl_on("held_out")
    select = KeepBest(raw, kl_on("validation"), every=evaluation_interval(settings.eval_every, steps), steps=steps,
                      patience=settings.patience, max_minutes=settings.max_minutes, keep_best=settings.keep_best)
    checkpoints = Checkpoints(artifact_path, key, raw, bool(settings.checkpoint_every or settings.checkpoint_minutes), steps, select)

    # the experts' KLs are balanced (`balance`); the retain data's (the base's row) counts retain_weight times
    retain = next((slot for slot, i in enumerate(data.experts) if job.rows[i] == job.retain_row), None)

    def micro_batch(step: int, micro: int) -> tuple:
        batch, bounds = _micro_batch(data, settings, step * settings.grad_accum + micro, packed)
        loss, kls = micro_batch_loss(view, data.experts, batch, teacher, settings, device, retain, bounds)
        return loss, batch.mask.sum(), {job.rows[i]: kl for i, kl in kls.items()}

    probe, probe_tokens = None, 0
    if settings.lr == "auto":
        chosen, probe, probe_tokens = choose_lr(Stage(list(raw.values()), probe_steps(steps), micro_batch), settings, kl_on("validation"),
                                  ranks=ranks, quiet=job.quiet or not distributed.is_main())
        settings = settings.model_copy(update={"lr": chosen})

    clock = [time.perf_counter()]

    def begin(optimizer):
        resumed = checkpoints.begin(optimizer, evaluate)
        if not resumed:
            select.measure(0)  # the linear start: the coefficients to beat
        clock[0] = time.perf_counter()  # tokens/s counts training, not the step-0 evaluations
        return resumed

    progress = tqdm(total=steps, desc="DAM training", disable=job.quiet or not distributed.is_main())
    history = fit(Stage(list(raw.values()), steps, micro_batch), settings, progress, ranks=ranks, begin=begin,
                  save=checkpoints.save, log_eta=True, select=select)
    progress.close()
    if distributed.is_main():
        validation_chart(select.report(), artifact_path + ".validation.png")

    coefficients, kl_start, kl_end = view.tables(), checkpoints.kl_start, evaluate()
    kl_fit = kl_on("train_sample")()  # the same measure on examples trained on: the gap is what did not generalise
    report = TrainingReport(
        mode="end_to_end", steps=steps, device=str(device), processes=ranks.world if ranks else 1, dtype=dtype_name(dtype),
        seconds=time.perf_counter() - started, tokens_per_second=_tokens_per_second(history[checkpoints.first_step:], clock[0]),
        peak_memory_bytes=peak_memory(device), trainable_coefficients=sum(p.numel() for p in raw.values()),
        held_out_kl={"step_0_linear_average": kl_start, "final": kl_end}, training_kl=kl_fit, loss_curve=_curve(history), estimate=plan,
        validation=select.report(), lr=settings.lr, lr_probe=probe, teacher=settings.teacher, packing=packed,
        tokens=sum(entry.get("tokens", 0) for entry in history) + probe_tokens,
    )
    checkpoints.remove()
    LOG.info("dam: trained in %.1f s; held-out KL per expert, linear average -> DAM (DAM on as many training examples): %s",
             report.seconds, {row: f"{kl_start[row]:.4f} -> {kl_end[row]:.4f} ({kl_fit[row]:.4f})" for row in kl_end})
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


def _check_memory(job, data: ExpertData, view: MergedModel, device, dtype, steps: int, ranks, host_cache: int = 0) -> dict:
    """Log what will train and the estimate; stop before training when it cannot fit.
    `host_cache`: bytes the cached teacher will keep in host memory (counted on CPU)."""
    settings, world = job.settings, ranks.world if ranks else 1
    raw = view.raw_parameters()
    trainable = sum(p.numel() for p in raw.values())
    length = min(settings.max_length, max(len(s) for seqs in data.train.values() for s in seqs))
    available = available_memory(device)

    def plan_for(mode: str) -> dict:
        return estimate(job, dtype, len(data.experts) * settings.batch_size, length, trainable, world, mode)

    view.recompute = recompute_mode(settings.recompute, ranks is not None, lambda mode: plan_for(mode)["peak_bytes"], available)
    plan = {**plan_for(view.recompute), "recompute": view.recompute}
    resident = resident_bytes() if device.type == "cpu" else None
    if resident:  # on CPU the process holds more than the stacks: measure it instead of the stacks' estimate
        memory = {name: size for name, size in plan["memory_bytes"].items() if name != "expert_weights"}
        memory["process_after_loading"] = resident  # runtime, expert stacks, checkpoint pages read into them
        if host_cache:
            memory["teacher_cache"] = host_cache
        plan = {**plan, "memory_bytes": memory, "peak_bytes": sum(memory.values())}
    LOG.info("dam: training %d coefficients (%d of %d tensors) for inputs %s; experts with data: %s",
             trainable, len(raw), len(job.tensors), job.rows, [job.rows[i] for i in data.experts])
    LOG.info("dam: %d steps on %s%s (%s, recompute: %s); estimated peak memory %.2f GiB%s, %.2f TFLOP per step",
             steps, device, f" x {world} processes (FSDP)" if ranks else "", dtype_name(dtype), view.recompute, plan["peak_bytes"] / 2**30,
             f" of {available / 2**30:.1f} GiB available" if available else "", plan["flops_per_step"] / 1e12)
    if available is not None and plan["peak_bytes"] - (resident or 0) > available:  # what is resident is had already
        raise DamError(
            f"dam: training needs about {plan['peak_bytes'] / 2**30:.1f} GiB on {device} but {available / 2**30:.1f} GiB "
            "is available; lower max_length or batch_size, use train_dtype: bfloat16, recompute: layer, mode: layerwise, "
            "or train on a larger device"
        )
    return plan


def _packs(settings, data: ExpertData, expert_logits, device) -> bool:
    """Whether training packs its micro-batches, logged: `on`, or `auto` on a CPU where
    padding is a large share, and the model's packed logits checked against its padded
    ones. `auto` pads on accelerators: there a small model's step is bound by the host,
    which packing adds to (on an H200 it made the lab's training 1.48x slower, where on a
    CPU it made it 1.81x faster; BENCHMARKS.md)."""
    if settings.packing == "off" or (settings.packing == "auto" and not packing.worth_packing(data.train)):
        return False
    if settings.packing == "auto" and device.type != "cpu":
        LOG.info("dam: packing: auto pads on %s (`packing: on` packs)", device.type)
        return False
    first = data.experts[0]  # one expert's model, on examples of every expert (so at least two when anything packs)
    examples = [example for i in data.experts for example in data.train[i]]
    works, difference = packing.check(lambda batch: expert_logits(first, batch), examples, data.pad_id)
    if works:
        LOG.info("dam: packing: short examples share rows (packed and padded logits agree to %.1e)", difference)
    else:
        LOG.info("dam: packing: off, this model's packed logits differ from its padded ones by up to %.3g; examples are padded",
                 difference)
    return works


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
