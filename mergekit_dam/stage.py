"""The pre-merge stage: decide, before mergekit runs a single task, where every tensor's
coefficients come from, and fail early (nothing written) when they cannot be had.

mergekit 0.1.5 gives a merge method no planning hook and no view of the whole config.
Its planner does call `method.validate_inputs` once per output slice right after
normalising the config, before any tensor task exists; `DamMerge.validate_inputs`
hands the calling planner to `prepare`. The kernels then find the decision in
`_PREPARED`, keyed by what each kernel call can see (settings + input names).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from mergekit_dam.artifact import open_artifact
from mergekit_dam.config import DamError, DamSettings, check_merge_config
from mergekit_dam.inventory import Inventory, plan_inventory

LOG = logging.getLogger("mergekit_dam")


@dataclass(frozen=True)
class CoefficientSource:
    """Where one merge's coefficients come from: an artifact, or equal weights 1/N."""

    rows: Tuple[str, ...]
    artifact_path: Optional[str]  # None = equal coefficients


_PREPARED: Dict[Tuple[str, Tuple[str, ...]], CoefficientSource] = {}
_LOCK = threading.Lock()


def _key(settings: DamSettings, rows: Sequence[str]) -> Tuple[str, Tuple[str, ...]]:
    return settings.model_dump_json(), tuple(sorted(rows))


def resolve_path(path: str) -> str:
    """Artifact paths resolve like mergekit's local model paths: `~` expanded, relative
    to the working directory of the mergekit run."""
    return os.path.abspath(os.path.expanduser(path))


def decide(settings: DamSettings, inventory: Inventory, datasets: Dict[str, str]) -> CoefficientSource:
    rows = tuple(inventory.row_names)
    path = resolve_path(settings.coefficients) if settings.coefficients else None
    with_data = [model for model in rows if datasets.get(model)]
    if path and os.path.exists(path) and not settings.retrain:
        artifact = open_artifact(path)
        artifact.check(rows, inventory.tensors)
        LOG.info("dam: applying coefficients from %s (no training)", path)
        return CoefficientSource(rows, path)
    if with_data:
        raise DamError(
            "dam: datasets are configured but this mergekit-dam release cannot train coefficients yet; "
            "give `coefficients:` an existing artifact, or remove the datasets for an equal-weight merge"
        )
    if settings.retrain:
        raise DamError("dam: `retrain: true` needs at least one input model with a `dataset:` to train on")
    if path:
        raise DamError(
            f"dam: coefficients file {path} does not exist and no input model has a `dataset` to learn "
            "coefficients from; fix the path, or add a `dataset:` to the experts' parameters"
        )
    LOG.info("dam: no coefficients and no datasets: equal coefficients 1/%d (a linear average)", len(rows))
    return CoefficientSource(rows, None)


def prepare(planner) -> CoefficientSource:
    """Run the pre-merge stage for a mergekit planner (config already normalised)."""
    dam = check_merge_config(planner.config)
    inventory = plan_inventory(planner, dam.settings.include_base)
    datasets = {name: model.dataset for name, model in dam.models.items()}
    source = decide(dam.settings, inventory, datasets)
    with _LOCK:
        _PREPARED[_key(dam.settings, source.rows)] = source
    return source


def source_for(settings: DamSettings, rows: Sequence[str]) -> CoefficientSource:
    """The coefficient source a kernel call should use.

    Prepared by `prepare` in mergekit runs; for direct Python API calls
    (`merge_state_dicts`, `merge_tensors`) it follows the `coefficients` setting.
    """
    with _LOCK:
        prepared = _PREPARED.get(_key(settings, rows))
    if prepared is not None:
        return prepared
    if settings.coefficients:
        return CoefficientSource(tuple(rows), resolve_path(settings.coefficients))
    return CoefficientSource(tuple(rows), None)
