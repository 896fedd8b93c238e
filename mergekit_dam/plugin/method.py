"""`merge_method: dam` for mergekit: a declarative spec plus a small kernel.

The spec declares every DAM setting so mergekit resolves and passes them to the kernel;
the kernel looks up where the coefficients come from (prepared.py) and applies them
(kernels.combine) in float32 on mergekit's math device. This is the apply path: it reads
the shared floor and the store of decisions, never the training engine; the pre-merge
stage that fills the store is handed in at registration (registration.py). Everything it
needs from mergekit beyond the merge-method API goes through host.py.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)

from mergekit_dam.core import auto
from mergekit_dam.core.artifact import open_artifact
from mergekit_dam.core.errors import DamError
from mergekit_dam.core.kernels import combine, combine_rows
from mergekit_dam.core.parametrizations import equal_coefficients
from mergekit_dam.core.settings import SHARED_NAMES, DamSettings, parameter_fields
from mergekit_dam.plugin import host
from mergekit_dam.plugin.inventory import merge_rows
from mergekit_dam.plugin.one_line_errors import install_error_hook
from mergekit_dam.plugin.prepared import PREPARED, CoefficientSource


def _spec() -> MergeMethodSpec:
    shared, per_model = parameter_fields()
    return MergeMethodSpec(
        name="dam",
        pretty_name="DAM (Differentiable Adaptive Merging)",
        reference_url="https://arxiv.org/abs/2410.08371",
        contract=InputContract(base=BasePolicy.OPTIONAL, min_inputs=1),
        parameters=tuple(
            ParameterSpec(name=name, value_type=kind, scope=ParameterScope.SHARED, default=default, description=text)
            for name, kind, default, text in shared
        )
        + tuple(
            ParameterSpec(name=name, value_type=kind, scope=ParameterScope.INPUT, default=default, description=text)
            for name, kind, default, text in per_model
        ),
    )


class DamMerge(GroupMergeMethod):
    """`prepare(context, planner)`: the pre-merge stage (decision.prepare), run once per
    mergekit merge when its planner first validates a slice."""

    def __init__(self, prepare: Callable[..., CoefficientSource]):
        self.spec = _spec()
        self.prepare = prepare

    def validate_inputs(self, input_ids: Sequence[Any], base_id: Any = None, *, group_name: Optional[str] = None) -> None:
        super().validate_inputs(input_ids, base_id, group_name=group_name)
        planner = host.calling_planner()  # None outside a mergekit merge (merge_state_dicts)
        if planner is not None and PREPARED.of(planner) is None:
            install_error_hook()  # a dam merge runs in this process from here on
            self.prepare(host.merge_context(planner), planner)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.id if group.base is not None else None
        trains = any(parameters["dataset"].values())
        settings = auto.parametrization(DamSettings(**{name: parameters[name] for name in SHARED_NAMES}), base, trains)
        rows = merge_rows([entry.id for entry in group.entries], base, settings.base_row)
        names = [str(model) for model in rows]
        source = PREPARED.for_kernel(settings, names)
        if source.artifact_path is None:
            if any(parameters["dataset"].get(model) for model in rows):
                raise DamError(
                    "dam: datasets given but no coefficients: training runs only from a mergekit config "
                    "(mergekit-yaml or mergekit.merge.run_merge); pass `coefficients` for this API"
                )
            coefficients = equal_coefficients(settings, names, str(base))
        else:
            coefficients = _artifact_rows(source.artifact_path, group, names)
        by_id = {entry.id: entry.tensor for entry in group.entries}
        weights = [by_id[model] for model in rows]
        factors = _artifact_row_factors(source.artifact_path, group, names) if source.artifact_path else None
        if factors is not None:  # granularity row_column
            return combine_rows(weights, coefficients, *factors).to(weights[0].dtype)
        if coefficients.shape[1] == 1 and weights[0].ndim > 0:
            coefficients = coefficients.expand(len(rows), weights[0].shape[-1])
        return combine(weights, coefficients).to(weights[0].dtype)


def _artifact_rows(path: str, group: TensorGroup, names: Sequence[str]) -> torch.Tensor:
    """The artifact's coefficients for this group's tensor, in the order of `names`."""
    artifact = open_artifact(path)
    name = group.metadata.name
    coefficients = artifact.get(name)[artifact.row_index(names)]
    expected = group.entries[0].tensor.shape[-1:] or (1,)
    if tuple(coefficients.shape[1:]) != tuple(expected):
        raise DamError(
            f"dam: {artifact.path} coefficients for {name} have {coefficients.shape[1]} columns, "
            f"the tensor has {expected[0]}; retrain or fix the path"
        )
    return coefficients


def _artifact_row_factors(path: str, group: TensorGroup, names: Sequence[str]) -> Optional[tuple]:
    """(row factors [N, out] in the order of `names`, the complement's index or None) of a
    format-/2 artifact's tensor that has them; None for a columns-only tensor."""
    artifact = open_artifact(path)
    rows = artifact.rows(group.metadata.name)
    if rows is None:
        return None
    complement = artifact.rows_complement()
    return rows[artifact.row_index(names)], (names.index(complement) if complement is not None else None)
