"""Layer-wise training (`mode: layerwise`): the coefficients of one group at a time, on
cached hidden states, for a device that cannot hold N experts of the whole model.

Stages, in the order the model computes (each `steps` optimizer steps of its own):
  embed    the input embedding's coefficients; target: each expert's embedding output.
  layer b  (b < L-1) layer b's coefficients. Input: the merged model's hidden states
           before layer b on expert i's data, cached from the stages already trained;
           target: expert i's own hidden states after layer b (its own trajectory, so a
           stage also corrects what the earlier merged layers got wrong).
  last     layer L-1 and the head (final norm, lm_head) together, with the end-to-end
           objective: temperature KL to expert i's logits.
Intermediate losses are the relative squared error sum_i |h - h_i|^2 / |h_i|^2 (masked
token means), plus the regularisers of that stage's coefficients (the cosine term is
then a mean over the stage's tensors rather than over all tensors).

How this differs from end-to-end: a layer is fitted to reproduce expert hidden states
given the merged prefix, not to minimise the final KL, and earlier layers never see
the gradient of later ones. Only the last stage optimises the logit objective.

Memory: one group's experts (N x one layer; the embedding stays for tied lm_heads) plus
one layer's activations on the device; the hidden-state caches (2 per training token,
3 per held-out token, x hidden size) stay on the CPU. Every layer runs through the
stock model: its forward builds masks and position embeddings, layers before the one
being trained hand the cached hidden states through, and the forward stops after it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Dict, List, Optional

import torch

from mergekit_dam.plugin.config import DamError
from mergekit_dam.training import distributed, objective
from mergekit_dam.training.data import collate
from mergekit_dam.training.trainer import (
    TrainingJob,
    TrainingResult,
    _schedule,
    batch_indices,
    build_view,
    peak_memory,
    prepare_data,
    resolve_device,
    start_run,
    steps_for,
)
from mergekit_dam.training.view import MergedModel

LOG = logging.getLogger("mergekit_dam")


class _Stop(Exception):
    """Ends the skeleton's forward once the layer of interest has run."""

    def __init__(self, value):
        super().__init__()
        self.value = value


def embedding_output(view: MergedModel, ids, mask, weights) -> torch.Tensor:
    """The hidden states entering layer 0 (the embedding output, as the model scales it)."""

    def intercept(block, hidden, args, kwargs):
        raise _Stop(hidden)

    return _stopped(view, intercept, dict(input_ids=ids), mask, weights)


def layer_output(view: MergedModel, selection: Optional[int], index: int, hidden, mask) -> tuple:
    """(output of layer `index` for input `hidden`, its trained tables)."""

    def intercept(block, incoming, args, kwargs):
        if block.index < index:
            return hidden
        raise _Stop(block.run(selection, hidden, *args, **kwargs))

    return _stopped(view, intercept, dict(inputs_embeds=torch.zeros_like(hidden)), mask, {})


def final_logits(view: MergedModel, selection: Optional[int], hidden, mask, weights) -> tuple:
    """(logits, trained tables of the last layer) from the hidden states entering the last layer."""
    last = len(view.blocks) - 1

    def intercept(block, incoming, args, kwargs):
        if block.index < last:
            return hidden
        output, tables = block.run(selection, hidden, *args, **kwargs)
        view.collected.update(tables)
        return output

    view.intercept = intercept
    try:
        return view(selection, None, mask, weights=weights, inputs_embeds=torch.zeros_like(hidden))
    finally:
        view.intercept = None


def _stopped(view: MergedModel, intercept, inputs: dict, mask, weights):
    view.intercept = intercept
    try:
        view(None, inputs.get("input_ids"), mask, weights=weights, inputs_embeds=inputs.get("inputs_embeds"))
    except _Stop as stop:
        return stop.value
    finally:
        view.intercept = None
    raise DamError("dam: layerwise: the model's forward did not reach its decoder layers; use mode: end_to_end")


def relative_error(student: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked token mean of |student - target|^2 over masked token mean of |target|^2."""
    weight = mask.to(torch.float32)
    error = ((student.float() - target.float()).pow(2).sum(-1) * weight).sum()
    scale = (target.float().pow(2).sum(-1) * weight).sum().clamp_min(1e-12)
    return error / scale


class Chunk:
    """`batch_size` sequences of one expert, padded once, with their cached hidden states."""

    def __init__(self, sequences, pad_id: int):
        self.ids, self.mask = collate(sequences, pad_id)
        self.expert: Optional[torch.Tensor] = None  # the expert's own hidden states (CPU)
        self.merged: Optional[torch.Tensor] = None  # the merged prefix's hidden states (CPU)
        self.linear: Optional[torch.Tensor] = None  # equal coefficients' (held-out only)


def train_layerwise(job: TrainingJob) -> TrainingResult:
    settings = job.settings
    if distributed.world_size() > 1:
        raise DamError("dam: mode: layerwise runs in one process; launch it without torchrun, or use mode: end_to_end")
    device = resolve_device(settings.train_device)
    dtype, started = start_run(settings, device)

    experts, train_sets, held_out, pad_id = prepare_data(job)

    def chunked(sequences) -> List[Chunk]:
        return [Chunk(sequences[k : k + settings.batch_size], pad_id) for k in range(0, len(sequences), settings.batch_size)]

    chunks = {i: chunked(train_sets[i]) for i in experts}
    checks = {i: chunked(held_out[i]) for i in experts}
    view = build_view(job, device, dtype, lazy=True)
    layers = len(view.blocks)
    skeleton = view.skeleton
    tied = skeleton.get_output_embeddings() is not None and skeleton.get_output_embeddings().weight is skeleton.get_input_embeddings().weight
    steps = steps_for(settings, train_sets)
    stages = ["embed", *[f"layer{b}" for b in range(layers - 1)], "last"]
    LOG.info("dam: layer-wise training: %d stages of %d steps on %s (%s), inputs %s", len(stages), steps, device,
             str(dtype).replace("torch.", ""), job.rows)

    from tqdm.auto import tqdm

    progress = tqdm(total=steps * len(stages), desc="DAM layer-wise", disable=job.quiet)
    tables: Dict[str, torch.Tensor] = {}
    history: List[dict] = []
    tokens_seen, clock = 0, time.perf_counter()

    def on(t):
        return t.to(device)

    def fit(stage: str, keys: List[str], loss_of) -> None:
        """`steps` AdamW steps on the raw coefficients of `keys`' groups; loss_of(expert, chunk)."""
        nonlocal tokens_seen
        params = [p for key in keys for p in view.groups[key].coefficients.raw]
        if not params:
            progress.update(steps)
            return
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        lr_factor = _schedule(settings, steps)
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * lr_factor(step)
            total = torch.zeros((), dtype=torch.float64)
            for micro in range(settings.grad_accum):
                loss = 0
                for i in experts:
                    pick = batch_indices(len(chunks[i]), 1, step * settings.grad_accum + micro, settings.seed, i)[0]
                    expert_loss, stage_tables = loss_of(i, chunks[i][pick])
                    loss = loss + expert_loss
                    tokens_seen += int(chunks[i][pick].mask.sum())
                loss = loss + objective.regularisers(stage_tables.values(), settings)
                (loss / settings.grad_accum).backward()
                total += loss.detach().double().cpu() / settings.grad_accum
            value = float(total)
            if not math.isfinite(value):
                raise DamError(f"dam: the training loss became {value} at step {step + 1} of stage {stage}; lower `lr` (now {settings.lr}) or check the data")
            if settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({"stage": stage, "step": step + 1, "loss": value})
            progress.update(1)
            progress.set_postfix(stage=stage, loss=f"{value:.4f}", tok_s=f"{tokens_seen / max(time.perf_counter() - clock, 1e-9):.0f}")

    def keep_tables(key: str) -> None:
        with torch.no_grad():
            for name, table in view.groups[key]("tables")[1].items():
                tables[name] = table.detach().float().cpu()

    # stage: embed
    embed = view.load("embed")
    with torch.no_grad():
        linear_embed = embed(None)[0]  # equal coefficients: the held-out baseline
        for i in experts:
            own = embed(i)[0]
            for chunk in chunks[i] + checks[i]:
                chunk.expert = embedding_output(view, on(chunk.ids), on(chunk.mask), own).cpu()
            for chunk in checks[i]:
                chunk.linear = embedding_output(view, on(chunk.ids), on(chunk.mask), linear_embed).cpu()
        if not tied:
            del linear_embed

    def embed_loss(i, chunk):
        weights, stage_tables = embed(None)
        hidden = embedding_output(view, on(chunk.ids), on(chunk.mask), weights)
        return relative_error(hidden, on(chunk.expert), on(chunk.mask)), stage_tables

    fit("embed", ["embed"], embed_loss)
    keep_tables("embed")
    with torch.no_grad():
        weights = embed(None)[0]
        for i in experts:
            for chunk in chunks[i] + checks[i]:
                chunk.merged = embedding_output(view, on(chunk.ids), on(chunk.mask), weights).cpu()
        del weights
    if not tied:
        view.unload("embed")

    # stages: every layer but the last
    for b in range(layers - 1):
        key = f"layer{b}"
        view.load(key)
        targets = {}
        with torch.no_grad():
            for i in experts:
                for chunk in chunks[i] + checks[i]:
                    targets[id(chunk)] = layer_output(view, i, b, on(chunk.expert), on(chunk.mask))[0].cpu()
                for chunk in checks[i]:  # equal coefficients, before training
                    chunk.linear = layer_output(view, None, b, on(chunk.linear), on(chunk.mask))[0].cpu()

        def block_loss(i, chunk, b=b):
            hidden, stage_tables = layer_output(view, None, b, on(chunk.merged), on(chunk.mask))
            return relative_error(hidden, on(targets[id(chunk)]), on(chunk.mask)), stage_tables

        fit(key, [key], block_loss)
        keep_tables(key)
        with torch.no_grad():
            for i in experts:
                for chunk in chunks[i] + checks[i]:
                    chunk.merged = layer_output(view, None, b, on(chunk.merged), on(chunk.mask))[0].cpu()
                    chunk.expert = targets.pop(id(chunk))
        view.unload(key)

    # stage: the last layer and the head, on the logit KL
    last = f"layer{layers - 1}"
    view.load(last)
    head = view.load("head")

    def outer(selection: Optional[int]) -> tuple:
        weights, stage_tables = head(selection)
        if tied:
            weights.update(embed(selection)[0] if selection is not None else {n: w.detach() for n, w in embed(None)[0].items()})
        return weights, stage_tables

    def logits_of(selection, hidden, mask) -> tuple:
        weights, head_tables = outer(selection)
        logits, layer_tables = final_logits(view, selection, hidden, mask, weights)
        return logits, {**head_tables, **layer_tables}

    def held_out_kl(cache: str) -> Dict[str, float]:
        result = {}
        with torch.no_grad():
            for i in experts:
                total, count = 0.0, 0
                for chunk in checks[i]:
                    mask = on(chunk.mask)
                    teacher = logits_of(i, on(chunk.expert), mask)[0]
                    if cache == "linear":  # equal coefficients everywhere (last layer and head are still 1/N)
                        weights = head(None)[0]
                        if tied:
                            weights.update(linear_embed)
                        student = final_logits(view, None, on(chunk.linear), mask, weights)[0]
                    else:
                        student = logits_of(None, on(chunk.merged), mask)[0]
                    total += objective.kl_divergence(student, teacher, mask, settings.temperature).item() * len(mask)
                    count += len(mask)
                result[job.rows[i]] = total / count
        return result

    kl_start = held_out_kl("linear")

    def last_loss(i, chunk):
        mask = on(chunk.mask)
        with torch.no_grad():
            teacher = logits_of(i, on(chunk.expert), mask)[0]
        student, stage_tables = logits_of(None, on(chunk.merged), mask)
        return objective.expert_loss(student, mask, settings, teacher=teacher)[0], stage_tables

    fit("last", [last, "head"], last_loss)
    keep_tables(last)
    keep_tables("head")
    kl_end = held_out_kl("merged")
    progress.close()

    seconds = time.perf_counter() - started
    report = {
        "mode": "layerwise",
        "steps": steps,
        "stages": len(stages),
        "device": str(device),
        "processes": 1,
        "dtype": str(dtype).replace("torch.", ""),
        "seconds": seconds,
        "tokens_per_second": tokens_seen / max(time.perf_counter() - clock, 1e-9),
        "peak_memory_bytes": peak_memory(device),
        "trainable_coefficients": sum(t.numel() for name, t in tables.items() if name in view._trained),
        "held_out_kl": {"step_0_linear_average": kl_start, "final": kl_end},
        "loss_curve": history,
    }
    LOG.info("dam: trained layer-wise in %.1f s; held-out KL per expert, linear average -> DAM: %s", seconds,
             {row: f"{kl_start[row]:.4f} -> {kl_end[row]:.4f}" for row in kl_end})
    return TrainingResult({name: tables[name] for name in sorted(tables)}, report)
