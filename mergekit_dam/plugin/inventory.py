"""What one DAM merge works on: its input models (artifact rows) and its tensors.

Read from a merge's MergeContext (host.py) before anything runs, so that every mismatch (an artifact for
other models, a missing tensor, a reshuffled layer) is reported before mergekit writes
a single byte of output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from mergekit_dam.core.errors import DamError
from mergekit_dam.core.tensor_spec import TensorSpec
from mergekit_dam.plugin import host
from mergekit_dam.plugin.host import MergeContext


@dataclass(frozen=True)
class Inventory:
    inputs: Tuple[object, ...]  # every mergekit input (ModelReference), config order
    base: Optional[object]  # the configured base model, if any
    rows: Tuple[object, ...]  # inputs that get coefficients, artifact row order
    tensors: Tuple[TensorSpec, ...]

    @property
    def row_names(self) -> List[str]:
        return [str(model) for model in self.rows]


def merge_rows(inputs: Sequence[object], base: Optional[object], include_base: bool) -> List[object]:
    """Inputs that carry coefficients: all but the base, plus the base when asked for.

    With DAM the base model only supplies the skeleton (config, tokenizer) unless
    `include_base`; a merge of the base alone degenerates to the base.
    """
    rows = [model for model in inputs if model != base or include_base]
    return rows or list(inputs)


def _ordered_inputs(config) -> List[object]:
    seen: Dict[str, object] = {}
    for module in config.modules.values():
        for out_slice in module.slices:
            for source in out_slice.sources:
                seen.setdefault(str(source.model), source.model)
    return list(seen.values())


def _check_identity_slices(context: MergeContext) -> None:
    """DAM coefficients belong to one tensor of one layer of every input; only slices that
    keep each layer in place (no frankenmerge reordering or stacking) can use them."""
    for module_name, module in context.config.modules.items():
        for out_slice in module.slices:
            lengths = {str(s.model): s.layer_range[1] - s.layer_range[0] for s in out_slice.sources}
            if len(set(lengths.values())) > 1:
                listing = ", ".join(f"{model}: {count}" for model, count in lengths.items())
                raise DamError(f"dam: the inputs have different numbers of layers ({listing}); DAM merges models of one geometry")
        position = 0
        for out_slice in module.slices:
            for source in out_slice.sources:
                if tuple(source.layer_range) != (position, source.layer_range[1]):
                    raise DamError(
                        f"dam: slice source {source.model} layers {list(source.layer_range)} would be "
                        f"moved to output layer {position}; DAM merges layer i of every input into "
                        "layer i, so use `models:` or slices with identical layer ranges"
                    )
            position = out_slice.sources[0].layer_range[1]
        for model in {str(s.model): s.model for sl in module.slices for s in sl.sources}.values():
            total = host.num_layers(context, module_name, model)
            if position != total:
                raise DamError(
                    f"dam: the slices cover layers [0, {position}) but {model} has {total}; "
                    "DAM merges whole models, so cover every layer"
                )


def _shape_and_float(loader, name: str) -> Tuple[Tuple[int, ...], bool]:
    index = loader.index
    path = os.path.join(index.base_path, index.tensor_paths[name])
    if index.is_safetensors:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            view = handle.get_slice(name)
            return tuple(view.get_shape()), view.get_dtype() in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
    tensor = loader.get_tensor(name)
    return tuple(tensor.shape), tensor.is_floating_point()


def tensor_specs(context: MergeContext, models: Sequence[object]) -> List[TensorSpec]:
    """Every floating tensor mergekit will produce, with its shape, found the way
    mergekit's planner and loader find it (aliases, tied names, optional weights)."""
    loaders = {str(model): host.tensor_loader(model) for model in models}
    for model, loader in loaders.items():
        if not loader.index.is_safetensors and not context.lazy_unpickle:
            raise DamError(
                f"dam: {model} has only pickle (.bin) weights, which can run code when loaded; convert it to "
                "safetensors, or pass mergekit's --lazy-unpickle to use its restricted unpickler"
            )
    specs: List[TensorSpec] = []
    for weight in host.output_weights(context):
        direct = [weight.name, *(weight.aliases or ())]
        present = {
            model: next((n for n in direct + list(weight.tied_names or ()) if n in loader.index.tensor_paths), None)
            for model, loader in loaders.items()
        }
        if weight.optional and not any(
            n in loader.index.tensor_paths for loader in loaders.values() for n in direct
        ):
            continue  # mergekit skips it too (e.g. lm_head of tied-embedding models)
        missing = [model for model, found in present.items() if found is None]
        if missing:
            raise DamError(
                f"dam: tensor {weight.name} is missing from {', '.join(missing)}; "
                "all inputs must have the same tensors (same architecture and tying)"
            )
        shapes = {model: _shape_and_float(loaders[model], found) for model, found in present.items()}
        (shape, is_float), *others = shapes.values()
        if any(other[0] != shape for other in others):
            listing = ", ".join(f"{model}: {list(s)}" for model, (s, _) in shapes.items())
            raise DamError(f"dam: tensor {weight.name} has different shapes across inputs ({listing})")
        if is_float:
            specs.append(TensorSpec(weight.name, shape, tuple(present.values())))
    return specs


def plan_inventory(context: MergeContext, include_base: bool) -> Inventory:
    """The inventory of one merge (its config normalised: modules -> slices -> sources)."""
    config = context.config
    base = config.base_model
    inputs = _ordered_inputs(config)
    if include_base and base is None:
        raise DamError("dam: `include_base: true` needs a `base_model:`; set one or drop include_base")
    _check_identity_slices(context)
    rows = merge_rows(inputs, base, include_base)
    tensors = tensor_specs(context, rows)
    return Inventory(inputs=tuple(inputs), base=base, rows=tuple(rows), tensors=tuple(tensors))
