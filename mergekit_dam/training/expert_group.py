"""One group of tensors merged together (the input embedding, a decoder layer, or the
head): the expert stacks [N, *shape] and their coefficients, the unit that is gathered
together and sharded by FSDP; and how `recompute: weights` rebuilds a merged weight in
backward instead of keeping it.

Merged weights come from `kernels.ColumnMerge`, which keeps nothing for backward but the
coefficients and the (persistent) expert stack.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from mergekit_dam.core.artifact import ROWS
from mergekit_dam.core.kernels import ColumnMerge, combine_rows, merge_stack
from mergekit_dam.training.coefficients import Coefficients
from mergekit_dam.training.distributed import full


class ExpertGroup(torch.nn.Module):
    """The expert stacks [N, *shape] (frozen parameters) of one group's tensors and their
    coefficients: the unit merged together, gathered together, and sharded by FSDP."""

    def __init__(self, names: Sequence[str], full_names: Sequence[str], stacks: Sequence[torch.Tensor], coefficients: Coefficients):
        super().__init__()
        self.names = list(names)  # as the module that runs them sees them
        self.full_names = list(full_names)  # in the checkpoint and the artifact
        self.stacks = torch.nn.ParameterList([torch.nn.Parameter(s, requires_grad=False) for s in stacks])
        self.coefficients = coefficients
        self.copy_experts = False  # FSDP: an expert's slice must outlive the gathered stack

    def forward(self, selection: Optional[int], rebuilt: Optional["RebuiltWeights"] = None) -> tuple:
        """(weights by name, effective tables of the trained tensors by full name): merged
        weights for selection None, expert `selection`'s own weights for an index.
        `rebuilt`: where to record how each merged weight is made."""
        if selection is not None:
            return {n: s[selection].clone() if self.copy_experts else s[selection] for n, s in zip(self.names, self.stacks)}, {}
        weights, tables = {}, {}
        rows = self.coefficients.row_tables()
        for name, full_name, stack, table, row in zip(self.names, self.full_names, self.stacks, self.coefficients(), rows):
            if row is not None:  # granularity row_column: autograd through the plain merge (no fused kernel, no rebuild)
                complement = getattr(self.coefficients.parametrization, "base_row", None)
                weights[name] = combine_rows(stack, table, row, complement).to(stack.dtype)
                if table.requires_grad:
                    tables[full_name] = table
                continue
            if table.requires_grad:
                weights[name], tables[full_name] = ColumnMerge.apply(table, stack), table
            else:
                weights[name] = merge_stack(table, stack)
            if rebuilt is not None:
                rebuilt.record(weights[name], table, stack)
        return weights, tables

    def tables(self) -> Dict[str, torch.Tensor]:
        """Effective coefficients [N, D] of every tensor by full name, whole (gathered
        from the ranks when sharded), detached, float32, on CPU; with row factors, those too
        ([N, out], under the tensor's name + artifact.ROWS)."""
        with torch.no_grad():
            tables = {name: table.detach().float().cpu().contiguous() for name, table in zip(self.full_names, self.coefficients(full))}
            rows = {name + ROWS: row.detach().float().cpu().contiguous()
                    for name, row in zip(self.full_names, self.coefficients.row_tables(full)) if row is not None}
            return {**tables, **rows}


class RebuiltWeights:
    """Saved-tensor hooks for `recompute: weights`: when autograd saves a merged weight
    (or a view of it, such as the transpose a matmul keeps) for backward, keep how to make
    it (its coefficient table and expert stack) instead, and merge it again when backward
    needs it. The same kernel on the same inputs gives the same bits. Merged weights are
    recognised by their storage, which is theirs alone while they are held here."""

    def __init__(self):
        self.made: Dict[int, tuple] = {}  # storage address -> (weight, table, stack)

    def record(self, weight: torch.Tensor, table: torch.Tensor, stack: torch.Tensor) -> None:
        self.made[weight.untyped_storage().data_ptr()] = (weight, table.detach(), stack)

    def pack(self, tensor: torch.Tensor):
        entry = self.made.get(tensor.untyped_storage().data_ptr()) if tensor.device.type != "meta" else None
        if entry is None or entry[0].dtype != tensor.dtype:
            return tensor
        _, table, stack = entry
        return table, stack, tensor.size(), tensor.stride(), tensor.storage_offset()

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        table, stack, size, stride, offset = packed
        with torch.no_grad():
            return merge_stack(table, stack).as_strided(size, stride, offset)

    def close(self) -> None:
        """The layer has run: let its merged weights go."""
        self.made.clear()


def stack_experts(tensors, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[N, *shape] in `dtype` on `device`, filled one expert at a time (no extra copy)."""
    tensors = list(tensors)
    stack = torch.empty((len(tensors), *tensors[0].shape), dtype=dtype, device=device)
    for index, tensor in enumerate(tensors):
        stack[index].copy_(tensor)
    return stack
