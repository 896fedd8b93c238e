"""`merge_method: dam` for mergekit: a declarative spec plus a small kernel.

The spec declares every DAM setting so mergekit resolves and passes them to the kernel;
the kernel looks up where the coefficients come from (stage.py) and applies them
(kernels.combine) in float32 on mergekit's math device. Everything it needs from
mergekit beyond the merge-method API goes through host.py.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Optional, Sequence

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)

from mergekit_dam.kernels import combine
from mergekit_dam.plugin import host, preflight, stage
from mergekit_dam.plugin.artifact import open_artifact
from mergekit_dam.plugin.config import (
    SHARED_NAMES,
    DamError,
    DamSettings,
    parameter_fields,
)
from mergekit_dam.plugin.inventory import merge_rows


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


def equal_coefficients(settings: DamSettings, names: Sequence[str], base: str) -> torch.Tensor:
    """[rows, 1] coefficients where nothing was trained: training's start. With weights,
    1/N each (the linear average); with task vectors, each expert `init_weight` (unset:
    1/N of the experts, the same average) and the base 1 − Σ, i.e. task arithmetic."""
    from mergekit_dam.training.experts import parametrization_for

    start = parametrization_for(settings, names.index(base) if base in names else None)(len(names))
    return start.table(torch.full((start.rows, 1), float(start.start)))


class DamMerge(GroupMergeMethod):
    def __init__(self):
        self.spec = _spec()
        self.prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # planner -> CoefficientSource

    def validate_inputs(self, input_ids: Sequence[Any], base_id: Any = None, *, group_name: Optional[str] = None) -> None:
        super().validate_inputs(input_ids, base_id, group_name=group_name)
        planner = host.calling_planner()  # None outside a mergekit merge (merge_state_dicts)
        if planner is not None and planner not in self.prepared:
            install_error_hook()  # a dam merge runs in this process from here on
            self.prepared[planner] = stage.prepare(host.merge_context(planner))

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.id if group.base is not None else None
        trains = any(parameters["dataset"].values())
        settings = stage.resolve_parametrization(DamSettings(**{name: parameters[name] for name in SHARED_NAMES}), base, trains)
        rows = merge_rows([entry.id for entry in group.entries], base, settings.base_row)
        names = [str(model) for model in rows]
        source = stage.source_for(settings, names)
        if source.artifact_path is None:
            if any(parameters["dataset"].get(model) for model in rows):
                raise DamError(
                    "dam: datasets given but no coefficients: training runs only from a mergekit config "
                    "(mergekit-yaml or mergekit.merge.run_merge); pass `coefficients` for this API"
                )
            coefficients = equal_coefficients(settings, names, str(base))
        else:
            artifact = open_artifact(source.artifact_path)
            name = group.metadata.name
            coefficients = artifact.get(name)[artifact.row_index(names)]
            expected = group.entries[0].tensor.shape[-1:] or (1,)
            if tuple(coefficients.shape[1:]) != tuple(expected):
                raise DamError(
                    f"dam: {artifact.path} coefficients for {name} have {coefficients.shape[1]} columns, "
                    f"the tensor has {expected[0]}; retrain or fix the path"
                )
        by_id = {entry.id: entry.tensor for entry in group.entries}
        weights = [by_id[model] for model in rows]
        if coefficients.shape[1] == 1 and weights[0].ndim > 0:
            coefficients = coefficients.expand(len(rows), weights[0].shape[-1])
        return combine(weights, coefficients).to(weights[0].dtype)


def _one_line_errors(previous_hook):
    """mergekit-yaml lets exceptions escape as tracebacks; a DamError is the user's
    setup problem, so print its one-line message (problem + fix) and exit 1."""

    def hook(kind, error, traceback):
        if issubclass(kind, DamError):
            print(f"mergekit-dam error: {error}", file=sys.stderr)
            sys.exit(1)
        previous_hook(kind, error, traceback)

    hook.dam_hook = True
    return hook


def install_error_hook() -> None:
    """Report an uncaught DamError as one line (see `_one_line_errors`); installed when
    a dam merge's pre-merge stage starts, never at import; calling it again is a no-op."""
    if not getattr(sys.excepthook, "dam_hook", False):
        sys.excepthook = _one_line_errors(sys.excepthook)


def register() -> None:
    """Add `dam` to mergekit's registry; calling it again is a no-op."""
    preflight.install()  # mergekit.merge already imported (no .pth hook): wrap run_merge now
    existing = {method.spec.name: method for method in registry.registered_methods()}
    if "dam" in existing:
        if type(existing["dam"]).__name__ != DamMerge.__name__:
            raise RuntimeError("another plugin already registered merge method 'dam'")
        return
    registry.register(DamMerge())
