"""Learn the coefficients: set-up, the training loop, checkpoints, the report.

One optimizer step = `grad_accum` micro-batches; a micro-batch holds `batch_size`
sequences of every expert that has data, all through ONE merged forward. Expert i's
logits (the teacher) come from the same skeleton with expert i's own weights, online
or as a top-K cache computed before training. Data order is a function of (seed,
step), so a run resumed from a checkpoint ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from mergekit_dam.plugin.config import DamError, DamSettings, ModelSettings
from mergekit_dam.plugin.inventory import TensorSpec
from mergekit_dam.training import distributed, objective
from mergekit_dam.training.data import collate, tokenize
from mergekit_dam.training.view import (
    NONLINEARITIES,
    MergedModel,
    build_skeleton,
    stack_experts,
    tensor_kinds,
)

LOG = logging.getLogger("mergekit_dam")
HELD_OUT_MAX = 32  # sequences per expert kept aside for the report's held-out KL


@dataclass
class TrainingJob:
    """Everything training needs, resolved from a mergekit config by stage.py."""

    rows: List[str]  # artifact row order
    models: List[object]  # ModelReference per row
    tensors: Sequence[TensorSpec]
    data: Dict[str, ModelSettings]  # rows with a dataset
    settings: DamSettings
    out_config: object  # transformers config of the output model (the skeleton)
    tokenizer: object
    trust_remote_code: bool = False
    quiet: bool = False


@dataclass
class TrainingResult:
    coefficients: Dict[str, torch.Tensor]  # effective [N, D] per tensor
    report: dict = field(default_factory=dict)


# --- devices, dtypes, initial values --------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DamError(f"dam: train_device `{name}` is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DamError(f"dam: train_device `{name}` but no CUDA GPU is available; use train_device: cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DamError(f"dam: train_device `{name}` but only {torch.cuda.device_count()} GPU(s) exist")
    if device.type not in ("cpu", "cuda"):
        raise DamError(f"dam: train_device `{name}` is not supported; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def trains(kind: str, settings: DamSettings) -> bool:
    return kind == "linear" or (kind == "embedding" and settings.train_embeddings) or (kind == "norm" and settings.train_norms)


# --- data order -----------------------------------------------------------------------


def batch_indices(count: int, batch_size: int, micro_step: int, seed: int, salt: int) -> List[int]:
    """The sequences of one expert in micro-batch `micro_step`: consecutive slices of
    per-epoch permutations, each permutation a pure function of (seed, salt, epoch)."""
    indices = []
    for position in range(micro_step * batch_size, (micro_step + 1) * batch_size):
        epoch, offset = divmod(position, count)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + salt * 7919 + epoch)
        indices.append(int(torch.randperm(count, generator=generator)[offset]))
    return indices


# --- checkpoints (safetensors: no pickle) ---------------------------------------------


def _checkpoint_path(artifact_path: str) -> str:
    return artifact_path + ".ckpt"


def save_checkpoint(path: str, key: str, step: int, raw: Dict[str, torch.nn.Parameter], optimizer, history: list) -> None:
    """Whole tensors (gathered from the ranks when sharded), written by rank 0."""
    from mergekit_dam.plugin.artifact import atomic_save

    tensors = {f"raw/{name}": distributed.full(p.detach()) for name, p in raw.items()}
    for name, p in raw.items():
        state = optimizer.state.get(p, {})
        for slot in ("exp_avg", "exp_avg_sq"):
            if slot in state:
                tensors[f"{slot}/{name}"] = distributed.full(state[slot])
    adam_steps = {name: float(optimizer.state[p]["step"]) for name, p in raw.items() if p in optimizer.state}
    if distributed.is_main():
        atomic_save(path, tensors, {"key": key, "step": str(step), "history": json.dumps(history), "adam_steps": json.dumps(adam_steps)})


def load_checkpoint(path: str, key: str, raw: Dict[str, torch.nn.Parameter], optimizer):
    """(step, history) of a checkpoint for this exact training key, or None."""
    from safetensors import SafetensorError, safe_open

    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("key") != key:
                return None
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError):
        LOG.warning("dam: ignoring unreadable training checkpoint %s", path)
        return None
    adam_steps = json.loads(metadata["adam_steps"])
    with torch.no_grad():
        for name, p in raw.items():
            p.copy_(distributed.like(p, tensors[f"raw/{name}"]))
            if f"exp_avg/{name}" in tensors:
                optimizer.state[p] = {
                    "step": torch.tensor(adam_steps[name]),
                    "exp_avg": distributed.like(p, tensors[f"exp_avg/{name}"]),
                    "exp_avg_sq": distributed.like(p, tensors[f"exp_avg_sq/{name}"]),
                }
    return int(metadata["step"]), json.loads(metadata["history"])


# --- the estimate shown before training -----------------------------------------------


def estimate(job: TrainingJob, dtype: torch.dtype, sequences: int, length: int, trainable: int, world: int = 1) -> dict:
    """Peak memory (bytes, per process) and work (FLOPs per step, all processes) of one
    training step, from the shapes. Sharded over `world` processes, each keeps 1/world
    of the experts and coefficients plus one layer's experts gathered, and runs
    1/world of the micro-batches."""
    params = sum(math.prod(spec.shape) for spec in job.tensors)
    element = torch.finfo(dtype).bits // 8
    vocab = job.out_config.vocab_size
    hidden = getattr(job.out_config, "hidden_size", 0)
    layers = getattr(job.out_config, "num_hidden_layers", 0)
    tokens = sequences * length
    per_layer = tokens * hidden * element * 16  # one layer's saved activations
    outer_sizes = [math.prod(s.shape) for s in job.tensors if ".layers." not in s.name]
    layer_size = (params - sum(outer_sizes)) // max(1, layers)
    if job.settings.recompute:  # embedding and head merged all along, one layer at a time; layer inputs kept
        merged = sum(outer_sizes) + layer_size
        activations = tokens * hidden * layers * element + per_layer
    else:
        merged, activations = params, per_layer * layers
    # sharded: this rank's share, plus FSDP's all-gather input, output and unsharded copy of the largest group
    gathered = 3 * len(job.rows) * max([layer_size, *outer_sizes]) * element if world > 1 else 0
    memory = {
        "expert_weights": len(job.rows) * params * element // world + gathered,
        "merged_weights": merged * element,
        "coefficients_and_adam": trainable * 4 * 4 // world,
        "logits": tokens * vocab * 4 * 4,  # student + teacher fp32, softmax temporaries
        "activations": activations,
    }
    flops = 2 * params * tokens * 3 + 2 * params * tokens  # merged fwd+bwd, teachers fwd
    return {"memory_bytes": memory, "peak_bytes": sum(memory.values()), "flops_per_step": flops}


def available_memory(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- training -------------------------------------------------------------------------


class ExpertStacks(Mapping):
    """Tensor name -> [N, *shape] expert stack in `dtype` on `device`, read from the
    input checkpoints when asked for (the view asks once per tensor, group by group)."""

    def __init__(self, job: TrainingJob, device: torch.device, dtype: torch.dtype):
        from mergekit_dam.plugin.host import tensor_loader

        self.loaders = [tensor_loader(model) for model in job.models]
        self.specs = {spec.name: spec for spec in job.tensors}
        self.device, self.dtype = device, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        sources = self.specs[name].sources
        return stack_experts((loader.get_tensor(source, device="cpu") for loader, source in zip(self.loaders, sources)), self.device, self.dtype)

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def prepare_data(job: TrainingJob) -> tuple:
    """(experts: rows with data, training sequences per expert, a held-out tail per
    expert for the report, the padding id)."""
    settings = job.settings
    pad_id = job.tokenizer.pad_token_id if job.tokenizer.pad_token_id is not None else (job.tokenizer.eos_token_id or 0)
    experts = [index for index, row in enumerate(job.rows) if row in job.data]
    train_sets, held_out = {}, {}
    for index in experts:
        row = job.rows[index]
        sequences = tokenize(job.data[row], job.tokenizer, row, samples=settings.samples, max_length=settings.max_length, seed=settings.seed)
        keep = max(1, min(HELD_OUT_MAX, len(sequences) // 10)) if len(sequences) >= 2 else 0
        train_sets[index] = sequences[: len(sequences) - keep] if keep else sequences
        held_out[index] = sequences[len(sequences) - keep :] if keep else sequences
        if not keep:
            LOG.warning("dam: %s has a single example; its held-out KL is measured on training data", row)
    return experts, train_sets, held_out, pad_id


def steps_for(settings: DamSettings, train_sets) -> int:
    steps_per_epoch = math.ceil(max(len(s) for s in train_sets.values()) / settings.batch_size / settings.grad_accum)
    return settings.steps or max(1, math.ceil(settings.epochs * steps_per_epoch))


def start_run(settings: DamSettings, device: torch.device) -> tuple:
    """(expert dtype, start time) of a training run: seeds, and zeroes the device's peak memory."""
    torch.manual_seed(settings.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return resolve_dtype(settings.train_dtype, device), time.perf_counter()


def train(job: TrainingJob, key: str, artifact_path: str) -> TrainingResult:
    settings = job.settings
    if settings.mode == "layerwise":
        from mergekit_dam.training.layerwise import train_layerwise

        return train_layerwise(job)
    world = distributed.world_size()
    if settings.grad_accum % world:
        raise DamError(
            f"dam: sharded training splits each step's grad_accum micro-batches across the {world} processes; "
            f"set grad_accum to a multiple of {world} (now {settings.grad_accum})"
        )
    ranks = distributed.setup(settings.train_device)
    device = ranks.device if ranks else resolve_device(settings.train_device)
    dtype, started = start_run(settings, device)

    experts, train_sets, held_out, pad_id = prepare_data(job)

    # model view and coefficients
    view = build_view(job, device, dtype, ranks)
    raw = view.raw_parameters()
    trainable = sum(p.numel() for p in raw.values())

    steps = steps_for(settings, train_sets)
    length = min(settings.max_length, max(len(s) for seqs in train_sets.values() for s in seqs))
    plan = estimate(job, dtype, len(experts) * settings.batch_size, length, trainable, world)
    available = available_memory(device)
    LOG.info(
        "dam: training %d coefficients (%d of %d tensors) for inputs %s; experts with data: %s",
        trainable, len(raw), len(job.tensors), job.rows, [job.rows[i] for i in experts],
    )
    LOG.info(
        "dam: %d steps on %s%s (%s); estimated peak memory %.2f GiB%s, %.2f TFLOP per step",
        steps, device, f" x {world} processes (FSDP)" if ranks else "", str(dtype).replace("torch.", ""), plan["peak_bytes"] / 2**30,
        f" of {available / 2**30:.1f} GiB available" if available else "", plan["flops_per_step"] / 1e12,
    )
    if available is not None and plan["peak_bytes"] > available:
        raise DamError(
            f"dam: training needs about {plan['peak_bytes'] / 2**30:.1f} GiB on {device} but {available / 2**30:.1f} GiB "
            "is available; lower max_length or batch_size, use train_dtype: bfloat16, or train on a larger device"
        )

    optimizer = torch.optim.AdamW(list(raw.values()), lr=settings.lr, weight_decay=settings.weight_decay)
    lr_factor = _schedule(settings, steps)  # set per step: a resumed run needs no scheduler state

    def held_out_kl() -> Dict[str, float]:
        result = {}
        with torch.no_grad():
            for index in experts:
                total, count = 0.0, 0
                sequences = held_out[index]
                for begin in range(0, len(sequences), settings.batch_size):
                    ids, mask = (t.to(device) for t in collate(sequences[begin : begin + settings.batch_size], pad_id))
                    teacher = view.expert_logits(index, ids, mask)
                    student, _ = view.merged_logits(ids, mask)
                    total += objective.kl_divergence(student, teacher, mask, settings.temperature).item() * len(ids)
                    count += len(ids)
                result[job.rows[index]] = total / count
        return result

    topk_cache = _topk_cache(view, experts, train_sets, settings, pad_id, device) if settings.teacher == "topk" else None

    checkpoint = _checkpoint_path(artifact_path)
    history: List[dict] = []
    first_step = 0
    resumed = load_checkpoint(checkpoint, key, raw, optimizer) if settings.checkpoint_every else None
    if resumed:
        first_step, history = resumed
        LOG.info("dam: resuming from %s at step %d of %d", checkpoint, first_step, steps)
    # step 0 = equal coefficients = the linear average; a resumed run kept it in its history
    kl_start = history[0]["held_out_kl"] if resumed else held_out_kl()

    from tqdm.auto import tqdm

    quiet = job.quiet or not distributed.is_main()
    progress = tqdm(range(first_step, steps), initial=first_step, total=steps, desc="DAM training", disable=quiet)
    tokens_seen, clock = 0, time.perf_counter()
    for step in progress:
        sums = torch.zeros(2 + len(experts), dtype=torch.float64)  # loss, tokens, KL per expert
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor(step)
        for micro in range(settings.grad_accum):
            if micro % world != (ranks.rank if ranks else 0):
                continue  # another process's micro-batch
            micro_step = step * settings.grad_accum + micro
            picks = {i: batch_indices(len(train_sets[i]), settings.batch_size, micro_step, settings.seed, i) for i in experts}
            sequences = [train_sets[i][k] for i in experts for k in picks[i]]
            ids, mask = (t.to(device) for t in collate(sequences, pad_id))
            topk = None
            if topk_cache is not None:
                topk = {i: _gather_topk(topk_cache[i], picks[i], ids.shape[1], device) for i in experts}
            loss, kls = micro_batch_loss(view, experts, ids, mask, settings, topk)
            sums += torch.stack([loss.detach(), mask.sum(), *[kl.detach() for kl in kls]]).double().cpu()
            # FSDP averages gradients over the processes; the step's gradient is the sum over micro-batches / grad_accum
            (loss * world / settings.grad_accum).backward()
            del loss
        if ranks:
            sums = ranks.sum(sums.to(device)).cpu()
        step_loss, tokens = float(sums[0]) / settings.grad_accum, int(sums[1])
        step_kl = {job.rows[index]: float(value) / settings.grad_accum for index, value in zip(experts, sums[2:])}
        tokens_seen += tokens
        if not math.isfinite(step_loss):
            raise DamError(
                f"dam: the training loss became {step_loss} at step {step + 1}; lower `lr` "
                f"(now {settings.lr}) or `temperature`, or check the data"
            )
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(raw.values()), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": step_loss, "kl": step_kl})
        if step == first_step and steps - first_step > 1:
            per_step = time.perf_counter() - clock
            LOG.info("dam: first step took %.2f s: about %.1f min for the remaining %d steps",
                     per_step, per_step * (steps - step - 1) / 60, steps - step - 1)
        if step == 0 and not resumed:
            history[0]["held_out_kl"] = kl_start
        elapsed = time.perf_counter() - clock
        progress.set_postfix(loss=f"{step_loss:.4f}", **{f"kl{i}": f"{v:.3f}" for i, v in enumerate(step_kl.values())}, tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}")
        if settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(checkpoint, key, step + 1, raw, optimizer, history)
    progress.close()

    coefficients = view.tables()
    kl_end = held_out_kl()
    seconds = time.perf_counter() - started
    report = {
        "steps": steps,
        "device": str(device),
        "processes": world,
        "dtype": str(dtype).replace("torch.", ""),
        "seconds": seconds,
        "tokens_per_second": tokens_seen / max(time.perf_counter() - clock, 1e-9),
        "peak_memory_bytes": peak_memory(device),
        "estimate": plan,
        "trainable_coefficients": trainable,
        "held_out_kl": {"step_0_linear_average": kl_start, "final": kl_end},
        "loss_curve": [{"step": h["step"], "loss": h["loss"], "kl": h["kl"]} for h in history],
    }
    if distributed.is_main() and os.path.exists(checkpoint):
        os.unlink(checkpoint)
    LOG.info("dam: trained in %.1f s; held-out KL per expert, linear average -> DAM: %s", seconds,
             {row: f"{kl_start[row]:.4f} -> {kl_end[row]:.4f}" for row in kl_end})
    return TrainingResult(coefficients, report)


def build_view(job: TrainingJob, device: torch.device, dtype: torch.dtype, ranks=None, lazy: bool = False) -> MergedModel:
    n = len(job.rows)
    if not math.isfinite(float(NONLINEARITIES[job.settings.nonlinearity][1](torch.tensor(1.0 / n)))):
        raise DamError(f"dam: nonlinearity `{job.settings.nonlinearity}` cannot represent the initial coefficient 1/{n}")
    skeleton = build_skeleton(job.out_config, device, job.trust_remote_code)
    kinds = tensor_kinds(skeleton)
    trained = {spec.name for spec in job.tensors if spec.name in kinds and trains(kinds[spec.name], job.settings)}
    view = MergedModel(
        skeleton, ExpertStacks(job, device, dtype), trained, job.settings.nonlinearity, job.settings.recompute,
        shard=ranks.shard if ranks else None, lazy=lazy,
    )
    if ranks:
        ranks.root(view)
    return view


def micro_batch_loss(view: MergedModel, experts: Sequence[int], ids, mask, settings, topk=None):
    """The loss of one micro-batch (rows: `batch_size` sequences of each expert with data,
    in `experts` order) and each expert's KL: one merged forward for all rows, each
    expert's teacher from its own weights (or its cached top-K)."""
    student, tables = view.merged_logits(ids, mask)
    loss = objective.regularisers(tables.values(), settings)
    kls = []
    for slot, index in enumerate(experts):
        rows = slice(slot * settings.batch_size, (slot + 1) * settings.batch_size)
        if topk is not None:
            expert_loss, kl = objective.expert_loss(student[rows], mask[rows], settings, topk=topk[index])
        else:
            with torch.no_grad():
                teacher = view.expert_logits(index, ids[rows], mask[rows])
            expert_loss, kl = objective.expert_loss(student[rows], mask[rows], settings, teacher=teacher)
        loss = loss + expert_loss
        kls.append(kl)
    return loss, kls


def _schedule(settings: DamSettings, steps: int):
    def factor(step: int) -> float:
        if settings.warmup_steps and step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, steps - settings.warmup_steps)
        if settings.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if settings.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def _topk_cache(view: MergedModel, experts, train_sets, settings, pad_id, device) -> dict:
    """Each expert's top-K log-probabilities at temperature T on its own training
    sequences, computed once before training and kept on CPU."""
    cache = {}
    with torch.no_grad():
        for index in experts:
            cache[index] = []
            for sequence in train_sets[index]:
                ids, mask = (t.to(device) for t in collate([sequence], pad_id))
                logits = view.expert_logits(index, ids, mask)[0].float()
                log_probs = torch.log_softmax(logits / settings.temperature, dim=-1)
                values, indices = log_probs.topk(min(settings.topk, log_probs.shape[-1]), dim=-1)
                cache[index].append((values.cpu(), indices.cpu()))
    return cache


def _gather_topk(cache, picks: Sequence[int], width: int, device) -> tuple:
    """Stack cached [L_i, K] entries into [B, width, K]; padding positions are masked out."""
    k = cache[picks[0]][0].shape[-1]
    values = torch.zeros(len(picks), width, k)
    indices = torch.zeros(len(picks), width, k, dtype=torch.long)
    for row, pick in enumerate(picks):
        v, i = cache[pick]
        values[row, : len(v)] = v
        indices[row, : len(i)] = i
    return values.to(device), indices.to(device)
