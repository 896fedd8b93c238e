"""DAM's configuration: the `parameters:` a mergekit config may give `merge_method: dam`.

Two kinds of settings, both validated here and nowhere else:
- `DamSettings`: one value for the whole merge, set in the top-level `parameters:`.
  Coefficients are learned jointly for every tensor, so a value that varied per tensor
  (mergekit gradients or filters) has no meaning; it is rejected, not silently used.
- `ModelSettings`: per input model, set in that model's `parameters:` (its dataset).

mergekit resolves parameters per tensor and silently ignores names a method does not
declare; `check_merge_config` reads the raw config so that typos fail loudly.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class DamError(ValueError):
    """A problem with the user's DAM setup; the message names it and the fix."""


def resolve_path(path: str) -> str:
    """Artifact and dataset paths resolve like mergekit's local model paths: `~`
    expanded, relative to the working directory of the run."""
    return os.path.abspath(os.path.expanduser(path))


class DamSettings(BaseModel):
    """Settings shared by every tensor of one DAM merge (top-level `parameters:`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Where the learned coefficients live. If the file exists and matches the inputs it is
    # applied as is; otherwise the training stage writes it there. "" = cache directory.
    coefficients: str = ""
    # Retrain even when a matching artifact exists.
    retrain: bool = False
    # Give the base model its own coefficients (it is otherwise only the skeleton).
    include_base: bool = False

    # Training stage (defaults follow the reference implementation; see README).
    seed: int = 42
    steps: Optional[int] = Field(None, ge=1, description="optimizer steps; unset = `epochs` over the data")
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    grad_clip: float = Field(1.0, ge=0)
    batch_size: int = Field(1, ge=1, description="sequences per expert per micro-batch")
    grad_accum: int = Field(1, ge=1)
    samples: int = Field(1700, ge=1, description="examples taken from each dataset")
    max_length: int = Field(2048, ge=2)
    temperature: float = Field(2.0, gt=0)
    similarity_weight: float = Field(0.01, ge=0)
    l1_weight: float = Field(0.0, ge=0)
    l2_weight: float = Field(0.0, ge=0)
    entropy_weight: float = Field(0.0, ge=0)
    mse_weight: float = Field(0.0, ge=0)
    nonlinearity: Literal["none", "tanh", "sigmoid", "relu"] = "none"
    train_embeddings: bool = True
    train_norms: bool = True
    teacher: Literal["online", "topk"] = "online"
    topk: int = Field(128, ge=1)
    train_device: str = "auto"
    train_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    checkpoint_every: int = Field(0, ge=0)
    recompute: bool = True  # rebuild each layer's merged weights and activations in backward
    # end_to_end: the logit KL through the whole merged model; layerwise: one group at a
    # time on cached hidden states (memory ~ one layer x N experts; see layerwise.py).
    mode: Literal["end_to_end", "layerwise"] = "end_to_end"
    # >1: mergekit-yaml launches this many training processes with torchrun (FSDP; one per GPU)
    processes: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _compatible(self):
        if self.teacher == "topk" and self.mse_weight:
            raise ValueError("mse_weight needs full expert logits: use teacher: online")
        if self.mode == "layerwise" and self.teacher == "topk":
            raise ValueError("teacher: topk does not apply to mode: layerwise (its last stage takes the experts' logits from cached hidden states); use teacher: online")
        if self.mode == "layerwise" and self.processes > 1:
            raise ValueError("mode: layerwise runs in one process; drop `processes` or use mode: end_to_end")
        if self.mode == "layerwise" and self.checkpoint_every:
            raise ValueError("checkpoint_every is not supported with mode: layerwise (its stages are short); drop it")
        return self


class ModelSettings(BaseModel):
    """Settings of one input model (that model's `parameters:`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Local file (.jsonl/.json/.parquet/.csv/.txt) or a Hugging Face dataset id.
    dataset: str = ""
    dataset_config: str = ""
    dataset_split: str = "train"
    # Record field holding plain text; chat `messages` and prompt/response are detected.
    text_field: str = "text"


SHARED_NAMES: Tuple[str, ...] = tuple(DamSettings.model_fields)
MODEL_NAMES: Tuple[str, ...] = tuple(ModelSettings.model_fields)


def _fields_with_defaults(model: type[BaseModel]) -> List[Tuple[str, Any, Any]]:
    return [(name, field.annotation, field.default) for name, field in model.model_fields.items()]


def parameter_fields() -> Tuple[List[Tuple[str, Any, Any]], List[Tuple[str, Any, Any]]]:
    """(name, type, default) of shared and per-model settings, for mergekit's spec."""
    return _fields_with_defaults(DamSettings), _fields_with_defaults(ModelSettings)


def _first_error(error: ValidationError, where: str) -> DamError:
    first = error.errors()[0]
    name = ".".join(str(part) for part in first["loc"])
    if not name:
        return DamError(f"dam: invalid settings in {where}: {first['msg'].removeprefix('Value error, ')}")
    return DamError(f"dam: invalid value for `{name}` in {where}: {first['msg']} (got {first.get('input')!r})")


def parse_settings(values: Mapping[str, Any], where: str = "parameters") -> DamSettings:
    try:
        return DamSettings.model_validate(dict(values))
    except ValidationError as error:
        raise _first_error(error, where) from None


def parse_model_settings(values: Mapping[str, Any], model: str) -> ModelSettings:
    try:
        return ModelSettings.model_validate(dict(values))
    except ValidationError as error:
        raise _first_error(error, f"the parameters of model {model}") from None


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
