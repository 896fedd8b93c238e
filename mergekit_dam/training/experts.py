"""The experts on the training device: their weights stacked per tensor ([N, *shape] in
the training dtype, read from the input checkpoints group by group) and the merged-model
view built over them, with the coefficients that train."""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import torch

from mergekit_dam.plugin.config import DamError, DamSettings
from mergekit_dam.plugin.host import tensor_loader
from mergekit_dam.training.view import (
    NONLINEARITIES,
    ColumnWeights,
    MergedModel,
    TaskVectors,
    build_skeleton,
    stack_experts,
    tensor_kinds,
)


class ExpertStacks(Mapping):
    """Tensor name -> [N, *shape] expert stack in `dtype` on `device`, read from the
    input checkpoints when asked for (the view asks once per tensor, group by group)."""

    def __init__(self, job, device: torch.device, dtype: torch.dtype):
        self.models = [str(model) for model in job.models]
        self.loaders = [tensor_loader(model) for model in job.models]
        self.specs = {spec.name: spec for spec in job.tensors}
        self.device, self.dtype = device, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        sources = self.specs[name].sources
        stack = stack_experts((loader.get_tensor(source, device="cpu") for loader, source in zip(self.loaders, sources)), self.device, self.dtype)
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
    from mergekit_dam.plugin.artifact import open_artifact
    from mergekit_dam.plugin.config import resolve_path

    artifact = open_artifact(resolve_path(job.settings.init_from))
    rows = artifact.row_index([str(model) for model in job.models])
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


def parametrization_for(settings: DamSettings, base_row: Optional[int]) -> Callable[[int], object]:
    """rows -> the settings' parametrization (view.ColumnWeights or view.TaskVectors)."""
    if settings.parametrization == "task_vectors":
        return lambda n: TaskVectors(n, base_row, settings.init_weight)
    return ColumnWeights


def build_view(job, device: torch.device, dtype: torch.dtype, ranks=None, lazy: bool = False) -> MergedModel:
    """The merged-model view of the job's experts; sharded (each group an FSDP unit,
    the view the root) when `ranks` is given; `lazy`: no group loaded yet."""
    settings = job.settings
    parametrization = parametrization_for(settings, job.base_row)
    start = parametrization(len(job.rows)).start
    if not math.isfinite(float(NONLINEARITIES[settings.nonlinearity][1](torch.tensor(start)))):
        raise DamError(f"dam: nonlinearity `{settings.nonlinearity}` cannot represent the initial coefficient {start:g}; "
                       "use nonlinearity: none or another start")
    skeleton = build_skeleton(job.out_config, device, job.trust_remote_code)
    kinds = tensor_kinds(skeleton)
    trained = {spec.name for spec in job.tensors if spec.name in kinds and trains(kinds[spec.name], job.settings)}
    # end-to-end training settles `auto` against its memory estimate; one layer at a time (layerwise) it fits
    recompute = "weights" if settings.recompute == "auto" else settings.recompute
    view = MergedModel(
        skeleton, ExpertStacks(job, device, dtype), trained, settings.nonlinearity, recompute, starts=warm_start(job),
        shard=ranks.shard if ranks else None, lazy=lazy, parametrization=parametrization, granularity=settings.granularity,
    )
    if ranks:
        ranks.root(view)
    return view
