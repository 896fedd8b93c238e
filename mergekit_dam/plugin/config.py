"""The `parameters:` blocks of a mergekit config that uses `merge_method: dam`, read raw.

mergekit resolves parameters per tensor and silently ignores names a method does not
declare; `check_merge_config` reads the normalised config itself, so that a typo, a
setting in the wrong block or a per-tensor value fails loudly, before anything runs.
"""

from __future__ import annotations

import difflib
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from pydantic import BaseModel, ConfigDict

from mergekit_dam.core.errors import DamError
from mergekit_dam.core.settings import (
    MODEL_NAMES,
    SHARED_NAMES,
    DamSettings,
    ModelSettings,
    parse_model_settings,
    parse_settings,
)


def _suggest(name: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _plain_value(name: str, setting: Any, where: str) -> Any:
    """A DAM setting must be one scalar: gradients and filters would vary it per tensor."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    raise DamError(
        f"dam: `{name}` in {where} must be a single value, not a gradient or filter list "
        f"({setting!r}): DAM learns all tensors together, so per-tensor values do not apply"
    )


def _check_names(params: Optional[Mapping[str, Any]], allowed: Tuple[str, ...], where: str, other: Tuple[str, ...], other_where: str) -> Dict[str, Any]:
    values = {}
    for name, setting in (params or {}).items():
        if name in other and name not in allowed:
            raise DamError(f"dam: `{name}` belongs in {other_where}, not in {where}")
        if name not in allowed:
            raise DamError(
                f"dam: unknown parameter `{name}` in {where}{_suggest(name, allowed + other)}; "
                f"valid names: {', '.join(allowed)}"
            )
        values[name] = _plain_value(name, setting, where)
    return values


class ConfiguredDam(BaseModel):
    """DAM settings read from one mergekit config: shared settings + per-model settings."""

    model_config = ConfigDict(frozen=True)

    settings: DamSettings
    models: Dict[str, ModelSettings]  # keyed by the model reference as written


def check_merge_config(config: Any) -> ConfiguredDam:
    """Validate every `parameters:` block of a normalised mergekit MergeConfiguration.

    `config` is after MergePlanner.normalize_config: models live in modules[*].slices.
    """
    top = _check_names(config.parameters, SHARED_NAMES, "the top-level parameters", MODEL_NAMES, "a model's parameters")
    per_model: Dict[str, Dict[str, Any]] = {}
    for module_name, module in (config.modules or {}).items():
        where = f"module `{module_name}` parameters"
        if module.parameters:
            _check_names(module.parameters, (), where, SHARED_NAMES + MODEL_NAMES, "the top-level or a model's parameters")
        for index, out_slice in enumerate(module.slices or []):
            if out_slice.parameters:
                _check_names(out_slice.parameters, (), f"slice {index} parameters", SHARED_NAMES + MODEL_NAMES, "the top-level or a model's parameters")
            for source in out_slice.sources:
                name = str(source.model)
                values = _check_names(source.parameters, MODEL_NAMES, f"the parameters of model {name}", SHARED_NAMES, "the top-level parameters")
                if name in per_model and per_model[name] != values:
                    raise DamError(f"dam: model {name} has different parameters in different slices; give it one set")
                per_model[name] = values
    return ConfiguredDam(
        settings=parse_settings(top, "the top-level parameters"),
        models={name: parse_model_settings(values, name) for name, values in per_model.items()},
    )
