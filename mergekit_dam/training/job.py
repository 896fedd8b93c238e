"""What the training engine is given (a job, built from a mergekit config by the plugin's
launch) and what it returns (coefficients and a report)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from mergekit_dam.core.settings import DamSettings, ModelSettings
from mergekit_dam.core.tensor_spec import TensorSpec


@dataclass
class TrainingJob:
    """Everything training needs, built from a mergekit config by plugin/launch.py."""

    rows: List[str]  # artifact row order (the input models' names)
    readers: Sequence[Callable[[str], torch.Tensor]]  # per row: checkpoint tensor name -> that tensor, on the CPU
    tensors: Sequence[TensorSpec]
    data: Dict[str, ModelSettings]  # rows with a dataset
    settings: DamSettings
    out_config: object  # transformers config of the output model (the skeleton)
    tokenizer: object
    trust_remote_code: bool = False
    quiet: bool = False
    base_row: Optional[int] = None  # the base's row, with parametrization: task_vectors
    retain_row: Optional[str] = None  # the row whose data is `retain_dataset` (the base's), its loss weighted by retain_weight


@dataclass
class TrainingReport:
    """The training report: written next to the artifact as `<artifact>.report.json`."""

    mode: str
    steps: int  # optimizer steps (per stage in layer-wise mode)
    device: str
    processes: int
    dtype: str  # of the expert stacks
    seconds: float
    tokens_per_second: float
    peak_memory_bytes: int
    trainable_coefficients: int
    held_out_kl: Dict[str, Dict[str, float]]  # {"step_0_linear_average": {row: KL}, "final": {row: KL}}
    loss_curve: List[dict]  # per step: step, loss, kl per expert (and stage, in layer-wise mode)
    # the final KL on as many of each expert's training examples as it holds out (end-to-end mode): far
    # below the held-out KL, the coefficients fit that expert's examples more than its skill
    training_kl: Optional[Dict[str, float]] = None
    stages: int = 1
    estimate: Optional[dict] = None  # the pre-training estimate (end-to-end mode)
    validation: Optional[dict] = None  # selection.KeepBest.report(): the curve and the kept step (end-to-end mode)
    lr: Optional[float] = None  # the learning rate used (`lr: auto`'s choice)
    lr_probe: Optional[Dict[str, float]] = None  # `lr: auto`: validation KL after the probe, per candidate rate
    teacher: Optional[str] = None  # the teacher used (`teacher: auto`'s choice)
    packing: Optional[bool] = None  # whether micro-batches were packed (`packing`'s choice, end-to-end mode)
    tokens: Optional[int] = None  # real tokens through the merged model in training (forward + backward), the probe's included
    answers: Optional[Dict[str, dict]] = None  # per expert: its examples, and those without an answer token (answers.py)
    resolved: Optional[Dict[str, Any]] = None  # every setting that accepts `auto`, as this run used it (core/auto.py)
    held_back: Optional[Dict[str, float]] = None  # experts their partners hold back: share of the start's KL left on their own examples (conflicts.py)

    def to_dict(self) -> dict:
        return {name: value for name, value in asdict(self).items() if value is not None}


@dataclass
class TrainingResult:
    coefficients: Dict[str, torch.Tensor]  # effective [N, D] per tensor
    report: TrainingReport = field(default=None)
