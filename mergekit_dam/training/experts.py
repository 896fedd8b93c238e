"""The experts on the training device: their weights stacked per tensor ([N, *shape] in
the training dtype, read from the input checkpoints group by group) and the merged-model
view built over them, with the coefficients that train."""

from __future__ import annotations

import math
from typing import Mapping

import torch

from mergekit_dam.core.artifact import open_artifact
from mergekit_dam.core.errors import DamError
from mergekit_dam.core.parametrizations import NONLINEARITIES, parametrization_for
from mergekit_dam.core.paths import resolve_path
from mergekit_dam.core.settings import DamSettings
from mergekit_dam.training.expert_group import stack_experts
from mergekit_dam.training.merged_model import MergedModel
from mergekit_dam.training.skeleton import build_skeleton, tensor_kinds


class ExpertStacks(Mapping):
    """Tensor name -> [N, *shape] expert stack in `dtype` on `device`, read from the
    input checkpoints when asked for (the view asks once per tensor, group by group)."""

    def __init__(self, job, device: torch.device, dtype: torch.dtype):
        self.models = list(job.rows)
        self.readers = job.readers
        self.specs = {spec.name: spec for spec in job.tensors}
        self.device, self.dtype = device, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        sources = self.specs[name].sources
        stack = stack_experts((read(source) for read, source in zip(self.readers, sources)), self.device, self.dtype)
        finite = torch.isfinite(stack.reshape(len(self.models), -1)).all(dim=1)
        if not bool(finite.all()):  # training would only report a NaN loss, not its cause
            bad = [model for model, ok in zip(self.models, finite.tolist()) if not ok]
            raise DamError(f"dam: {bad[0]} has NaN or Inf values in tensor {name} (as {self.dtype}); "
                           "fix or replace that model (or its train_dtype overflows: use train_dtype: float32)")
        return stack

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def warm_start(job):
    """full name -> the [N, D] table of `init_from`'s artifact in the job's row order, or None."""
    if not job.settings.init_from:
        return None
    artifact = open_artifact(resolve_path(job.settings.init_from))
    rows = artifact.row_index(list(job.rows))
    shapes = {spec.name: spec.shape for spec in job.tensors}

    def start(name: str) -> torch.Tensor:
        table = artifact.get(name)[rows]
        if table.shape[1] != (shapes[name][-1] if shapes[name] else 1):
            raise DamError(f"dam: init_from {artifact.path} has {table.shape[1]} columns for {name}, the tensor "
                           f"{shapes[name][-1]}; start from an artifact of these models")
        return table

    return start


def trains(kind: str, settings: DamSettings) -> bool:
    """Whether a tensor of this kind (view.tensor_kinds) learns coefficients."""
    return kind == "linear" or (kind == "embedding" and settings.train_embeddings) or (kind == "norm" and settings.train_norms)


def build_view(job, device: torch.device, dtype: torch.dtype, ranks=None, lazy: bool = False) -> MergedModel:
    """The merged-model view of the job's experts (its `recompute` set by the mode, from
    auto.recompute); sharded (each group an FSDP unit, the view the root) when `ranks` is
    given; `lazy`: no group loaded yet."""
    settings = job.settings
    parametrization = parametrization_for(settings, job.base_row)
    start = parametrization(len(job.rows)).start
    if not math.isfinite(float(NONLINEARITIES[settings.nonlinearity][1](torch.tensor(start)))):
        raise DamError(f"dam: nonlinearity `{settings.nonlinearity}` cannot represent the initial coefficient {start:g}; "
                       "use nonlinearity: none or another start")
    skeleton = build_skeleton(job.out_config, device, job.trust_remote_code)
    kinds = tensor_kinds(skeleton)
    trained = {spec.name for spec in job.tensors if spec.name in kinds and trains(kinds[spec.name], job.settings)}
    view = MergedModel(
        skeleton, ExpertStacks(job, device, dtype), trained, settings.nonlinearity, starts=warm_start(job),
        shard=ranks.shard if ranks else None, lazy=lazy, parametrization=parametrization, granularity=settings.granularity,
    )
    if ranks:
        ranks.root(view)
    return view
