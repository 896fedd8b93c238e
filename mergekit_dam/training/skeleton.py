"""The stock Hugging Face model a merge trains through, built once from the output config
with parameters on the meta device (buffers such as rotary frequencies stay real): no
per-architecture code and no modelling files. Weights are substituted at every forward
(torch.func.functional_call), so the skeleton holds none of its own."""

from __future__ import annotations

from typing import Dict

import torch

from mergekit_dam.core.errors import DamError


def tensor_kinds(skeleton: torch.nn.Module) -> Dict[str, str]:
    """'linear' (nn.Linear weights and biases, lm_head included), 'embedding', or 'norm'
    (every other parameter: RMSNorm/LayerNorm weights and the like)."""
    kinds = {}
    for module_name, module in skeleton.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, torch.nn.Linear):
                kinds[name] = "linear"
            elif isinstance(module, torch.nn.Embedding):
                kinds[name] = "embedding"
            else:
                kinds[name] = "norm"
    return kinds


def build_skeleton(config, device: torch.device, trust_remote_code: bool = False) -> torch.nn.Module:
    """The stock model class with meta parameters and real buffers on `device`, tied like the config."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    skeleton.tie_weights()  # from_config under empty init skips tying (transformers 5)
    for module in skeleton.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    skeleton.eval()  # no dropout: logits must be a deterministic function of the weights
    skeleton.requires_grad_(False)
    return skeleton


def decoder_layers(skeleton: torch.nn.Module) -> tuple:
    """(prefix, ModuleList) of the decoder layers: the ModuleList with num_hidden_layers entries."""
    count = getattr(skeleton.config, "num_hidden_layers", None)
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name, module
    raise DamError(f"dam: cannot find the {count} decoder layers of {type(skeleton).__name__}; DAM needs a decoder-only model")


def decoder_zeros(skeleton: torch.nn.Module, layers_prefix: str) -> Dict[str, torch.Tensor]:
    """Zeros for the decoder's own 1-D weights (its final norm), by their names inside the
    decoder: a run without the head needs them but never uses them, since the layers'
    inputs and outputs do not pass through them."""
    decoder_prefix, layers_name = layers_prefix.rsplit(".", 1)
    device = next((b.device for b in skeleton.buffers()), torch.device("cpu"))
    return {name: torch.zeros(p.shape, device=device) for name, p in skeleton.get_submodule(decoder_prefix).named_parameters()
            if p.ndim <= 1 and not name.startswith(layers_name + ".")}
