"""The merged-model view: the stock Hugging Face model, built once, computing with
merged weights W = sum_i c_i[None, :] * W_i (or with one expert's own weights).

No per-architecture code and no module surgery: the skeleton is instantiated from the
output config with parameters on the meta device (buffers such as rotary frequencies
stay real), and every forward substitutes weights with torch.func.functional_call.
Expert weights are stacked once per tensor, [N, *shape], frozen.

Memory: `ColumnMerge` builds a merged weight without keeping anything but the
coefficients for backward (the expert stack is persistent anyway); its backward
reduces dL/dW into dL/dc_i = sum over rows of dL/dW * W_i. The N expert sequences go
through one merged forward, so one merged copy of the model exists at a time, never N.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping

import torch
from torch.func import functional_call

from mergekit_dam.config import DamError


def merge_columns(coefficients: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """sum_i coefficients[i] (over the last axis) * experts[i], accumulated in float32,
    returned in the experts' dtype."""
    result = experts[0] * coefficients[0]  # promotes low-precision experts to float32
    for index in range(1, experts.shape[0]):
        result.addcmul_(experts[index], coefficients[index])
    return result.to(experts.dtype)


class ColumnMerge(torch.autograd.Function):
    """W = merge_columns(c, stack) with dL/dc from dL/dW and the frozen stack."""

    @staticmethod
    def forward(ctx, coefficients: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(coefficients, experts)
        return merge_columns(coefficients.detach(), experts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        coefficients, experts = ctx.saved_tensors
        grad = grad.to(torch.promote_types(grad.dtype, coefficients.dtype))  # reduce in >= float32
        rows = tuple(range(grad.ndim - 1))  # every axis but the column axis
        per_expert = [(grad * experts[index]).sum(dim=rows) if rows else grad * experts[index] for index in range(experts.shape[0])]
        return torch.stack(per_expert).to(coefficients.dtype), None


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


class MergedModel:
    """Forward passes of the merged model and of each expert through one skeleton."""

    def __init__(self, skeleton: torch.nn.Module, stacks: Mapping[str, torch.Tensor]):
        self.skeleton = skeleton
        self.stacks = dict(stacks)
        expected = {name for name, _ in skeleton.named_parameters()}
        missing, extra = expected - set(self.stacks), set(self.stacks) - expected
        if (missing, extra) == (set(), {"lm_head.weight"}) and getattr(skeleton.config, "tie_word_embeddings", False):
            raise DamError(
                "dam: the inputs mix tied and untied embeddings: the base/first model ties lm_head to the embedding "
                "(tie_word_embeddings) but an input has its own lm_head; use a base with an untied lm_head"
            )
        if missing or extra:
            raise DamError(
                "dam: the checkpoints' tensors do not match the model class built from the config "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}); DAM training needs "
                "checkpoints whose tensor names are the transformers model's own"
            )
        self.kinds = tensor_kinds(skeleton)
        self.frozen: Dict[str, torch.Tensor] = {}  # merged once: tensors whose coefficients do not train

    def logits(self, weights: Mapping[str, torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = functional_call(
            self.skeleton, dict(weights), args=(),
            kwargs=dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False),
        )
        return output.logits

    def expert_weights(self, index: int) -> Dict[str, torch.Tensor]:
        return {name: stack[index] for name, stack in self.stacks.items()}

    def freeze(self, coefficients: Mapping[str, torch.Tensor]) -> None:
        """Merge these tensors once with fixed coefficients; later forwards reuse them."""
        self.frozen = {name: merge_columns(table, self.stacks[name]) for name, table in coefficients.items()}

    def merged_weights(self, coefficients: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Merged weights, differentiable in `coefficients` (effective [N, D] tables for
        every tensor that is not frozen)."""
        weights = dict(self.frozen)
        for name, stack in self.stacks.items():
            if name in self.frozen:
                continue
            table = coefficients[name]
            if table.requires_grad:
                weights[name] = ColumnMerge.apply(table, stack)
            else:
                weights[name] = merge_columns(table, stack)
        return weights


def stack_experts(tensors: Iterable[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[N, *shape] in `dtype` on `device`, filled one expert at a time (no extra copy)."""
    tensors = list(tensors)
    stack = torch.empty((len(tensors), *tensors[0].shape), dtype=dtype, device=device)
    for index, tensor in enumerate(tensors):
        stack[index].copy_(tensor)
    return stack

