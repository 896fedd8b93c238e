"""DAM's settings: the `parameters:` a mergekit config may give `merge_method: dam`.

Two kinds, both validated here and nowhere else:
- `DamSettings`: one value for the whole merge, set in the top-level `parameters:`.
  Coefficients are learned jointly for every tensor, so a value that varied per tensor
  (mergekit gradients or filters) has no meaning; it is rejected, not silently used
  (plugin/config.py reads the raw mergekit config).
- `ModelSettings`: per input model, set in that model's `parameters:` (its dataset).

Each field's `description` is its documentation: mergekit's ParameterSpec and the
docs/configuration.md's tables (settings_table.py) are made from it; the field order is the table's.
Settings that accept `auto` are made concrete by `auto.py`, in one place.
"""

from __future__ import annotations

from typing import Any, List, Literal, Mapping, Optional, Tuple, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mergekit_dam.core.errors import DamError


class DamSettings(BaseModel):
    """Settings shared by every tensor of one DAM merge (top-level `parameters:`).

    Each field's `description` is its documentation: mergekit's ParameterSpec and the
    docs/configuration.md's tables (`settings_table`) are made from it; the field order is the table's.
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
        "general data (any dataset format) on which the merged model is kept close to the base model: "
        "KL(base ‖ merged), weighted by `retain_weight`, so that merging skills does not cost general text. "
        "The base, not the linear average, is the target: it is the model whose general skill is intact. "
        "Needs a base row (task vectors, the default with a base, or `include_base`)"))
    retain_weight: float = Field(1.0, ge=0, description=(
        "weight of the `retain_dataset` KL against each expert's (1)"))
    loss_on: Literal["answer", "all"] = Field("answer", description=(
        "`answer`: for records with an answer (chat `messages`: the assistant turns; `prompt`/`response`; "
        "Alpaca `output`) the KL is taken on the answer tokens only; `all`: on every token. "
        "Plain text always uses every token"))
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
    granularity: Literal["column", "tensor", "layer", "row_column"] = Field("column", description=(
        "what one coefficient covers: `column` (one per input column of each tensor, the paper's DAM), `tensor` (one "
        "per model per tensor) or `layer` (one per model per decoder layer, AdaMerging-style; the embedding and the "
        "head are one group each): fewer parameters for small data. The artifact stays [N, D] (broadcast values). "
        "`row_column` (beyond the paper): each decoder-layer matrix also learns one factor per output row, "
        "merged W = Σ (rᵢ ⊗ cᵢ) ⊙ Wᵢ (W_base + Σ (rᵢ ⊗ cᵢ) ⊙ (Wᵢ − W_base) with task vectors), for experts that read "
        "the same inputs and write different outputs; its artifact also holds the rows (format mergekit-dam/2). Its "
        "merge runs as plain PyTorch (no fused kernel) and keeps a few copies of each matrix for backward: for models "
        "well inside the device's memory"))
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
        "`online`: the experts' logits are computed at every step; "
        "`cached`: computed once before training, at the scored tokens, and kept in host memory "
        "(the same targets, no expert forward per step); "
        "`auto`: `cached` when that takes at most 2 GiB, else `online`; "
        "`topk`: each expert's top-`topk` log-probabilities are cached (in `mode: layerwise`, before its last stage)"))
    topk: int = Field(128, ge=1, description="K of `teacher: topk`")

    # Where and how training runs (all but `mode` left out of the training key).
    mode: Literal["end_to_end", "layerwise"] = Field("end_to_end", description=(
        "`end_to_end`: the logit KL through the whole merged model; `layerwise`: train one layer at a time on cached "
        "hidden states, memory about one layer × N experts (docs/gpu-and-scale.md, \"Layer-wise mode\")"))
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
        """Whether the base model gets a row of coefficients (`parametrization` made concrete: auto.parametrization)."""
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
