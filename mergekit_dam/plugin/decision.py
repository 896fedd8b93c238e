"""The pre-merge stage's decision: before mergekit runs a single task, where every tensor's
coefficients come from (an artifact, training, or equal weights), trained now if needed
(launch.py), failing early (nothing written) when they cannot be had.

mergekit 0.1.5's planner calls `method.validate_inputs` once per output slice right after
normalising the config, before any tensor task exists; `DamMerge.validate_inputs` hands
`prepare` the planner's MergeContext (host.py), and the decision goes into the one store
(prepared.py) where the kernel calls find it.
"""

from __future__ import annotations

import logging
import os

from mergekit_dam.core import auto
from mergekit_dam.core.artifact import open_artifact
from mergekit_dam.core.errors import DamError
from mergekit_dam.core.paths import resolve_path
from mergekit_dam.core.settings import DamSettings, ModelSettings
from mergekit_dam.plugin.config import check_merge_config
from mergekit_dam.plugin.host import MergeContext
from mergekit_dam.plugin.inventory import Inventory, plan_inventory
from mergekit_dam.plugin.prepared import PREPARED, CoefficientSource

LOG = logging.getLogger("mergekit_dam")


def retain_row(settings: DamSettings, inventory: Inventory, data) -> str:
    """The row whose logits `retain_dataset` keeps: the base's, which needs a row."""
    base = str(inventory.base) if inventory.base is not None else None
    if base is None or base not in inventory.row_names:
        raise DamError("dam: `retain_dataset` keeps the merge close to the base model, which needs a `base_model:` with a row "
                       "of coefficients (parametrization: task_vectors, the default with a base, or include_base: true)")
    if base in data:
        raise DamError(f"dam: the base model {base} has a `dataset:` and `retain_dataset` is set: both would be its data; "
                       "keep one")
    return base


def decide(context: MergeContext, dam, inventory: Inventory) -> CoefficientSource:
    settings = dam.settings
    rows = tuple(inventory.row_names)
    path = resolve_path(settings.coefficients) if settings.coefficients else None
    data = {row: dam.models[row] for row in rows if row in dam.models and dam.models[row].dataset}
    if data and settings.retain_dataset:
        data[retain_row(settings, inventory, data)] = ModelSettings(dataset=settings.retain_dataset)
    if data:
        from mergekit_dam.plugin.launch import trained_coefficients  # the training engine, only when something trains

        return CoefficientSource(rows, trained_coefficients(context, dam, inventory, data, path))
    if settings.retrain:
        raise DamError("dam: `retrain: true` needs at least one input model with a `dataset:` to train on")
    if path and os.path.exists(path):
        open_artifact(path).check(rows, inventory.tensors)
        LOG.info("dam: applying coefficients from %s (no datasets configured: no training)", path)
        return CoefficientSource(rows, path)
    if path:
        raise DamError(
            f"dam: coefficients file {path} does not exist and no input model has a `dataset` to learn "
            "coefficients from; fix the path, or add a `dataset:` to the experts' parameters"
        )
    LOG.info("dam: no coefficients and no datasets: equal coefficients 1/%d (a linear average)", len(rows))
    return CoefficientSource(rows, None)


def prepare(context: MergeContext, planner=None) -> CoefficientSource:
    """Run the pre-merge stage of one mergekit merge (its config already normalised) and
    store the decision (for `planner`, when mergekit's planner asked)."""
    dam = check_merge_config(context.config)
    trains = any(model.dataset for model in dam.models.values())
    dam = dam.model_copy(update={"settings": auto.parametrization(dam.settings, context.config.base_model, trains, log=True)})
    with PREPARED.lock:
        inventory = plan_inventory(context, dam.settings.base_row)
        source = decide(context, dam, inventory)
        PREPARED.add(planner, dam.settings, source)
    return source
