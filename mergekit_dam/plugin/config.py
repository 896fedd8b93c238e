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
from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional, Tuple, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class DamError(ValueError):
    """A problem with the user's DAM setup; the message names it and the fix."""


def resolve_path(path: str) -> str:
    """Artifact and dataset paths resolve like mergekit's local model paths: `~`
    expanded, relative to the working directory of the run."""
    return os.path.abspath(os.path.expanduser(path))


class DamSettings(BaseModel):
    """Settings shared by every tensor of one DAM merge (top-level `parameters:`).

    Each field's `description` is its documentation: mergekit's ParameterSpec and the
    README's table (`settings_table`) are made from it; the field order is the table's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The artifact.
    coefficients: str = Field("", description=(
        "artifact path (`~` expanded, relative to the working directory). If it exists and matches the inputs it is "
        "applied without training; otherwise training writes it there. Empty: trained coefficients go to the cache "
        "(`$MERGEKIT_DAM_CACHE`), and without datasets the coefficients are equal, 1/N"))
    retrain: bool = Field(False, description="train even if a matching artifact exists")
    include_base: bool = Field(False, description=(
        "give `base_model` its own coefficients; otherwise the base only supplies config and tokenizer"))

    # Data and length of training (defaults follow the reference implementation).
    seed: int = Field(42, description="training seed: the shuffle of each dataset, the batch order, torch's RNG")
    steps: Optional[int] = Field(None, ge=1, description=(
        "optimizer steps (≥ 1; per stage with `mode: layerwise`); unset: `epochs` passes over the data, at least "
        "`min_steps`"))
    epochs: float = Field(1.0, gt=0, description="passes over the data when `steps` is unset (fractions allowed)")
    min_steps: int = Field(560, ge=1, description=(
        "with `steps` unset, at least this many optimizer steps: a small calibration set is passed over several "
        "times (keep-best writes the best step seen)"))
    samples: int = Field(1700, ge=1, description="examples taken from each dataset")
    max_length: int = Field(2048, ge=2, description="tokens per example (longer examples are truncated)")
    retain_dataset: str = Field("", description=(
        "general data (any dataset format) on which the merged model is kept close to the base model: KL(base ‖ "
        "merged), weighted by `retain_weight`, so that merging skills does not cost general text. The base, not "
        "the linear average, is the target: it is the model whose general skill is intact. Needs a base row "
        "(task vectors, the default with a base, or `include_base`)"))
    retain_weight: float = Field(1.0, ge=0, description="weight of the `retain_dataset` KL against each expert's (1)")
    loss_on: Literal["answer", "all"] = Field("answer", description=(
        "`answer`: for records with an answer (chat `messages`: the assistant turns; `prompt`/`response`; Alpaca "
        "`output`) the KL is taken on the answer tokens only; `all`: on every token. Plain text always uses every token"))
    eval_every: int = Field(0, ge=0, description=(
        "measure the validation KL every this many steps (0: about 20 times per run); end-to-end mode"))
    keep_best: bool = Field(True, description=(
        "write the coefficients with the lowest validation KL seen, the linear start included (so never worse than "
        "it on validation), not the last ones"))
    patience: int = Field(0, ge=0, description=(
        "stop when the validation KL has not improved for this many evaluations in a row (0: run every step)"))
    max_minutes: Optional[float] = Field(None, gt=0, description=(
        "stop training after this many minutes, keeping the best coefficients so far (a budget: results then depend "
        "on the machine's speed)"))
    batch_size: Union[int, Literal["auto"]] = Field("auto", description=(
        "sequences per expert per micro-batch; `auto`: about 256 tokens per expert (the training examples' mean "
        "length decides, at least 1 and at most 64): 1 for 2048-token records, as the reference, more for short ones"))
    packing: Union[Literal["auto", "on", "off"], bool] = Field("auto", description=(  # bool: YAML's bare on / off
        "`auto`: training on a CPU where padding would be a fifth or more of a micro-batch, each expert's short "
        "examples share rows, each with its own positions and attention (the same logits, without computing the "
        "padding), after a check on the model that packed and padded logits agree (training pads where they do "
        "not); on a GPU, where a small model's step is bound by the host, `auto` pads; `on`: pack on any device "
        "whatever the padding (still checked); `off`: always pad. End-to-end mode"))
    grad_accum: int = Field(1, ge=1, description=(
        "micro-batches per optimizer step (gradient accumulation); with `processes` > 1 a multiple of the number "
        "of processes"))

    # The optimizer: AdamW on float32 coefficients.
    lr: Union[float, Literal["auto"]] = Field("auto", description=(
        "AdamW learning rate of the float32 coefficients; `auto`: before training, a few steps at a rate of the grid "
        "1e-3, 3e-3, 1e-2, 3e-2, 0.1 from the same start, climbing from 1e-2 toward lower validation KL until it rises, "
        "and the rate with the lowest KL is used (logged; `mode: layerwise` has no validation KL and uses 1e-2)"))
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="steps of linear learning-rate warmup")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description=(
        "learning rate after warmup: decayed to 0 along a `cosine` curve (the last steps settle instead of "
        "bouncing at the full rate) or a `linear` one, or `constant`"))
    grad_clip: float = Field(1.0, ge=0, description="clip the coefficients' gradient norm to this (0: no clipping)")

    # The objective: KL to each expert on its data, plus regularisers.
    temperature: float = Field(2.0, gt=0, description="KL temperature T on softmax(logits/T); the loss is scaled by T²")
    balance: float = Field(0.0, ge=0, description=(
        "how far each step leans toward the experts the merge matches worst: expert i's loss is weighted by "
        "L_i^balance, normalised to mean 1, from the micro-batch itself (not differentiated); 0: the plain sum "
        "(the paper's), 1: about the sum of squares, so that a skill already matched does not take the steps "
        "another still needs"))
    similarity_weight: float = Field(0.01, ge=0, description=(
        "weight of the mean pairwise cosine similarity of the experts' coefficient vectors"))
    l1_weight: float = Field(0.0, ge=0, description="weight of the L1 norm of all coefficients")
    l2_weight: float = Field(0.0, ge=0, description="weight of the L2 norm (not squared) of all coefficients")
    entropy_weight: float = Field(0.0, ge=0, description="weight of the entropy of the merged model's predictions")
    mse_weight: float = Field(0.0, ge=0, description=(
        "weight of the mean squared error between merged and expert logits (not with `teacher: topk`)"))
    granularity: Literal["column", "tensor", "layer"] = Field("column", description=(
        "what one coefficient covers: `column` (one per input column of each tensor, the paper's DAM), `tensor` (one "
        "per model per tensor) or `layer` (one per model per decoder layer, AdaMerging-style; the embedding and the "
        "head are one group each): fewer parameters for small data. The artifact stays [N, D] (broadcast values)"))
    parametrization: Literal["auto", "weights", "task_vectors"] = Field("auto", description=(
        "`weights`: merged W = Σ cᵢ ⊙ Wᵢ (the paper's DAM); `task_vectors`: merged W = W_base + Σ cᵢ ⊙ (Wᵢ − W_base), "
        "the base's row being 1 − Σ cᵢ, so that coefficients trade experts against the base rather than rescale a "
        "shared part (needs `base_model`; the artifact gets a base row); `auto`: `task_vectors` when training with a "
        "`base_model`, else `weights`; an existing `coefficients` file (without `retrain`) keeps the parametrization "
        "it was trained with"))
    init_weight: Optional[float] = Field(None, description=(
        "start of every expert's coefficient with `parametrization: task_vectors`: unset = 1/N (the linear average of "
        "the experts); λ = task arithmetic with weight λ"))
    init_from: Optional[str] = Field(None, description=(
        "a warm start: begin from the coefficients of this artifact (rows matched by model name; with a coarser "
        "`granularity` their column means) instead of the linear average"))
    nonlinearity: Literal["none", "tanh", "sigmoid", "relu"] = Field("none", description=(
        "`none`, `tanh`, `sigmoid` or `relu`, applied to the coefficients (the artifact stores effective values)"))
    train_embeddings: bool = Field(True, description=(
        "learn coefficients for the embeddings (`false`: they stay 1/N); linear layers and lm_head always learn"))
    train_norms: bool = Field(True, description="learn coefficients for norm weights (`false`: they stay 1/N)")
    teacher: Literal["auto", "online", "cached", "topk"] = Field("auto", description=(
        "`online`: the experts' logits are computed at every step; `cached`: computed once before training, "
        "at the scored tokens, and kept in host memory (the same targets, no expert forward per step); `auto`: "
        "`cached` when that takes at most 2 GiB, else `online`; `topk`: each expert's top-`topk` log-probabilities "
        "are cached (in `mode: layerwise`, before its last stage)"))
    topk: int = Field(128, ge=1, description="K of `teacher: topk`")

    # Where and how training runs (all but `mode` left out of the training key).
    mode: Literal["end_to_end", "layerwise"] = Field("end_to_end", description=(
        "`end_to_end`: the logit KL through the whole merged model; `layerwise`: train one layer at a time on cached "
        "hidden states, memory about one layer × N experts (README: \"Experts larger than one device\")"))
    train_device: str = Field("auto", description=(
        "`auto` (the first CUDA GPU, else CPU), `cpu`, `cuda` or `cuda:N`; never mergekit's math device"))
    train_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description=(
        "dtype of the expert weights: `auto` (`bfloat16` on GPU, `float32` on CPU), `bfloat16`, `float16` or "
        "`float32`; coefficients are float32"))
    processes: int = Field(1, ge=1, description=(
        "train in this many processes (FSDP2, one per GPU), launched by `mergekit-yaml` itself with torchrun"))
    recompute: Union[Literal["auto", "layer", "weights", "none"], bool] = Field("auto", description=(  # bool: the old on / off
        "what backward rebuilds instead of keeping: `layer` (activation checkpointing: one layer's merged weights "
        "and activations at a time, about 1/3 more compute), `weights` (keeps activations, rebuilds each merged "
        "weight from its coefficients: one merged model less memory, about one merge more per weight), `none` "
        "(keeps everything), `auto` (`weights` where the memory estimate fits, else `layer`; `layer` when sharded); "
        "`true`/`false` mean `layer`/`none`"))
    checkpoint_minutes: float = Field(5.0, ge=0, description=(
        "also write a training checkpoint every this many minutes (0: off), and one on SIGINT/SIGTERM before stopping, "
        "so that the same command resumes a killed run (end-to-end mode)"))
    checkpoint_every: int = Field(0, ge=0, description=(
        "training checkpoint (`<artifact>.ckpt`) interval in steps, to resume after a kill (0: none)"))

    @property
    def base_row(self) -> bool:
        """Whether the base model gets a row of coefficients (`parametrization` resolved: stage.resolve_parametrization)."""
        if self.parametrization == "auto":
            raise RuntimeError("parametrization: auto must be resolved against the merge first")
        return self.include_base or self.parametrization == "task_vectors"

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, value):
        if value != "auto" and not value > 0:
            raise ValueError("lr must be > 0 or `auto`")
        return value

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, value):
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError("batch_size must be an integer ≥ 1 or `auto`")
        return value

    @field_validator("recompute", mode="before")
    @classmethod
    def _recompute_bool(cls, value):
        return {True: "layer", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_bool(cls, value):  # YAML reads a bare on / off as a boolean
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _compatible(self):
        if self.init_weight is not None and self.init_from:
            raise ValueError("init_weight and init_from are two starts; keep one")
        if self.init_weight is not None and self.parametrization == "weights":
            raise ValueError("init_weight applies to parametrization: task_vectors; drop it or set the parametrization")
        if self.teacher == "topk" and self.mse_weight:
            raise ValueError("mse_weight needs full expert logits: use teacher: auto, online or cached")
        if self.mode == "layerwise" and self.processes > 1:
            raise ValueError("mode: layerwise runs in one process; drop `processes` or use mode: end_to_end")
        if self.mode == "layerwise" and self.retain_dataset:
            raise ValueError("retain_dataset is supported with mode: end_to_end; drop it or use that mode")
        if self.mode == "layerwise" and self.checkpoint_every:
            raise ValueError("checkpoint_every is not supported with mode: layerwise (its stages are short); drop it")
        return self


class ModelSettings(BaseModel):
    """Settings of one input model (that model's `parameters:`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field("", description=(
        "local `.jsonl/.json/.parquet/.csv/.txt` file or Hugging Face dataset id for this expert"))
    dataset_config: str = Field("", description="HF dataset configuration name")
    dataset_split: str = Field("train", description="HF dataset split")
    text_field: str = Field("text", description=(
        "record field with plain text (chat `messages` and prompt/response are detected)"))


SHARED_NAMES: Tuple[str, ...] = tuple(DamSettings.model_fields)
MODEL_NAMES: Tuple[str, ...] = tuple(ModelSettings.model_fields)


FieldRow = Tuple[str, Any, Any, str]


def _fields_with_defaults(model: type[BaseModel]) -> List[FieldRow]:
    return [(name, field.annotation, field.default, field.description) for name, field in model.model_fields.items()]


def parameter_fields() -> Tuple[List[FieldRow], List[FieldRow]]:
    """(name, type, default, description) of shared and per-model settings, for mergekit's spec."""
    return _fields_with_defaults(DamSettings), _fields_with_defaults(ModelSettings)


# --- documentation: the README's tables are made from the fields ---------------------------


def _default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{value}`"


def settings_table(model: type[BaseModel]) -> str:
    """The markdown table of a settings class: one row `| name | default | description |`
    per field, in field order (README.md's Configuration section shows these)."""
    rows = ["| name | default | description |", "|---|---|---|"]
    for name, field in model.model_fields.items():
        description = " ".join(field.description.split()).replace("|", "\\|")
        rows.append(f"| `{name}` | {_default_text(field.default)} | {description} |")
    return "\n".join(rows)


README_TABLES: Tuple[type[BaseModel], ...] = (ModelSettings, DamSettings)  # their order in README.md


def readme_tables(text: str) -> List[Tuple[int, int]]:
    """(first, last + 1) line numbers of each markdown table in the README's
    `## Configuration` section."""
    lines = text.split("\n")
    start = lines.index("## Configuration")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    spans: List[Tuple[int, int]] = []
    index = start
    while index < end:
        if lines[index].startswith("|"):
            first = index
            while index < end and lines[index].startswith("|"):
                index += 1
            spans.append((first, index))
        index += 1
    return spans


def update_readme_tables(path: str) -> None:
    """Rewrite the README's settings tables from the fields (after editing a description)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    spans = readme_tables(text)
    if len(spans) != len(README_TABLES):
        raise ValueError(f"{path}: expected {len(README_TABLES)} tables under ## Configuration, found {len(spans)}")
    lines = text.split("\n")
    for (first, stop), model in reversed(list(zip(spans, README_TABLES))):
        lines[first:stop] = settings_table(model).split("\n")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))


def _first_error(error: ValidationError, where: str) -> DamError:
    errors = error.errors()
    first = errors[0]
    if not first["loc"]:
        return DamError(f"dam: invalid settings in {where}: {first['msg'].removeprefix('Value error, ')}")
    name = str(first["loc"][0])  # settings are flat; a longer loc names the branches of a union (a number or `auto`)
    messages = dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errors if e["loc"] and str(e["loc"][0]) == name)
    return DamError(f"dam: invalid value for `{name}` in {where}: {'; or '.join(messages)} (got {first.get('input')!r})")


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
