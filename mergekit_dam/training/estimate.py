"""The estimate logged before training: peak memory per process and work per step,
from the shapes alone, so a run that cannot fit stops before it starts."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from mergekit_dam.plugin.config import DamError


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




def recompute_mode(setting: str, sharded: bool, peak: Callable[[str], int], available: Optional[int]) -> str:
    """The `recompute` mode a run uses: `auto` takes `weights` (no layer is run twice)
    when its estimated `peak` fits in 90% of the `available` memory, else `layer`;
    sharded runs use `layer` (a rebuilt weight would keep its layer's gathered experts
    from forward to backward)."""
    if setting == "weights" and sharded:
        raise DamError("dam: recompute: weights is for one process (sharded, it would keep every layer's gathered "
                       "experts until backward); use recompute: auto or layer")
    if setting != "auto":
        return setting
    if sharded:
        return "layer"
    return "weights" if available is None or peak("weights") <= 0.9 * available else "layer"
