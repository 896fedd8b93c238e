"""The estimate logged before training: peak memory per process and work per step,
from the shapes alone, so a run that cannot fit stops before it starts (and `recompute:
auto` is decided against it)."""

from __future__ import annotations

import logging
import math

import torch

from mergekit_dam.core import auto
from mergekit_dam.core.errors import DamError
from mergekit_dam.training.device import available_memory, dtype_name, resident_bytes

LOG = logging.getLogger("mergekit_dam")


def estimate(job, dtype: torch.dtype, sequences: int, length: int, trainable: int, world: int = 1, recompute: str = "layer") -> dict:
    """Peak memory (bytes, per process) and work (FLOPs per step, all processes) of one
    training step, from the shapes, for a resolved `recompute` mode. Sharded over `world`
    processes, each keeps 1/world of the experts and coefficients plus one layer's
    experts gathered, and runs 1/world of the micro-batches."""
    params = sum(math.prod(spec.shape) for spec in job.tensors)
    element = torch.finfo(dtype).bits // 8
    vocab = job.out_config.vocab_size
    hidden = getattr(job.out_config, "hidden_size", 0)
    layers = getattr(job.out_config, "num_hidden_layers", 0)
    intermediate = getattr(job.out_config, "intermediate_size", None) or 4 * hidden
    tokens = sequences * length
    # one layer's saved activations per token: about ten hidden-wide tensors (norms, q/k/v,
    # attention output, residuals) and four MLP-wide ones (gate, up, their activation and
    # product); checked on an H200 at 1B and 7B (BENCHMARKS.md)
    per_layer = tokens * element * (10 * hidden + 4 * intermediate)
    outer_sizes = [math.prod(s.shape) for s in job.tensors if ".layers." not in s.name]
    layer_size = (params - sum(outer_sizes)) // max(1, layers)
    if recompute == "layer":  # embedding and head merged all along, one layer at a time; layer inputs kept
        merged = sum(outer_sizes) + layer_size
        activations = tokens * hidden * layers * element + per_layer
    elif recompute == "weights":  # the same merged weights, every layer's activations
        merged, activations = sum(outer_sizes) + layer_size, per_layer * layers
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


def check_memory(job, data, view, device, dtype, steps: int, ranks, host_cache: int = 0) -> dict:
    """Log what will train and the estimate, and set the view's `recompute` (auto.recompute,
    against the estimate); stop before training when it cannot fit. `host_cache`: bytes the
    cached teacher will keep in host memory (counted on CPU). Returns the plan."""
    settings, world = job.settings, ranks.world if ranks else 1
    raw = view.raw_parameters()
    trainable = sum(p.numel() for p in raw.values())
    length = min(settings.max_length, max(len(s) for seqs in data.train.values() for s in seqs))
    available = available_memory(device)

    def plan_for(mode: str) -> dict:
        return estimate(job, dtype, len(data.experts) * settings.batch_size, length, trainable, world, mode)

    view.recompute = auto.recompute(settings.recompute, ranks is not None, lambda mode: plan_for(mode)["peak_bytes"], available)
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
