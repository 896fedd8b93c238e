"""Every `auto` setting made concrete, in one place.

Eight settings accept `auto`. Each has one function here that takes the facts it decides
by (the merge, the device, the data, the memory estimate, a probe) and returns the
concrete value, logging the choice when the setting was `auto`; a run keeps the values in
its `Resolved` record, which goes into the training report.

  parametrization  task_vectors with a base and data to train (an artifact on disk keeps its own), else weights
  train_device     the first CUDA GPU, else the CPU
  train_dtype      bfloat16 on a GPU, float32 on a CPU
  batch_size       about TOKENS_PER_EXPERT tokens per expert, from the examples' mean length
  teacher          cached when the cache takes at most CACHE_BUDGET_BYTES, else online
  recompute        weights where the memory estimate fits, else layer; layer when sharded
  packing          on a CPU where padding is a large share, if the model's packed logits agree
  lr               end to end: a probe of a grid on validation KL (lr_probe.py); layer-wise: LAYERWISE_LR
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from mergekit_dam.core.artifact import open_artifact
from mergekit_dam.core.errors import DamError
from mergekit_dam.core.paths import resolve_path
from mergekit_dam.core.settings import DamSettings

LOG = logging.getLogger("mergekit_dam")

TOKENS_PER_EXPERT = 256  # `batch_size: auto`: tokens per expert per micro-batch
AUTO_BATCH_MAX = 64
CACHE_BUDGET_BYTES = 2 * 2**30  # `teacher: auto` caches the experts' logits up to this much host memory
LAYERWISE_LR = 1e-2  # `lr: auto` in layer-wise mode, whose stages have no validation KL to probe against


class Resolved(dict):
    """The concrete value of each setting that accepts `auto`, for one run (the report's
    `resolved`): `settings` with them, as the run uses them."""

    def settings(self, settings: DamSettings) -> DamSettings:
        kept = {name: value for name, value in self.items() if name in ("batch_size", "teacher", "lr", "parametrization")}
        return settings.model_copy(update=kept)

    def report(self) -> Dict[str, object]:
        return {name: str(value).replace("torch.", "") if isinstance(value, (torch.device, torch.dtype)) else value
                for name, value in self.items()}


def parametrization(settings: DamSettings, base: Optional[object], trains: bool, log: bool = False) -> DamSettings:
    """`parametrization: auto` made concrete for one merge; the same answer in the pre-merge
    stage and in every kernel call, since it reads only the config and the artifact on disk
    (`log`: say it, once per merge). An existing artifact that will not be retrained keeps
    the parametrization it was trained with (its provenance; a file without one: a base row
    means task vectors), so that artifacts written before `auto` apply and reuse as they
    did. Otherwise task vectors when there is a base and something to train, else weights:
    equal coefficients stay the experts' linear average."""
    why = None
    if settings.parametrization != "auto":
        choice = settings.parametrization
    elif base is None:
        choice, why = "weights", "no base_model"
    else:
        path = resolve_path(settings.coefficients) if settings.coefficients else None
        if path and os.path.exists(path) and not settings.retrain:
            artifact = open_artifact(path)
            trained_with = (artifact.provenance("settings") or {}).get("parametrization")
            rows_say = "task_vectors" if str(base) in artifact.models and not settings.include_base else "weights"
            choice = trained_with if trained_with in ("weights", "task_vectors") else rows_say
            why = f"what {path} was trained with"
        else:
            choice = "task_vectors" if trains else "weights"
            why = "a base_model and data to train" if trains else "nothing to train: the linear average"
    if choice == "task_vectors" and base is None:
        raise DamError("dam: `parametrization: task_vectors` merges task vectors W_i - W_base and needs a `base_model:`; "
                       "set one or use parametrization: weights")
    if choice == "weights" and settings.init_weight is not None:
        raise DamError("dam: `init_weight` starts task vectors, which need a `base_model:` and something to train; "
                       "set both or drop init_weight")
    if log and why:
        LOG.info("dam: parametrization: auto is %s (%s)", choice, why)
    return settings.model_copy(update={"parametrization": choice})


def device(name: str) -> torch.device:
    """`train_device` as a torch device: auto = the first CUDA GPU if there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise DamError(f"dam: train_device `{name}` is not a device; use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise DamError(f"dam: train_device `{name}` but no CUDA GPU is available; use train_device: cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise DamError(f"dam: train_device `{name}` but only {torch.cuda.device_count()} GPU(s) exist")
    if chosen.type not in ("cpu", "cuda"):
        raise DamError(f"dam: train_device `{name}` is not supported; use auto, cpu, cuda or cuda:N")
    return chosen


def dtype(name: str, on: torch.device) -> torch.dtype:
    """The expert stacks' dtype: auto = bfloat16 on a GPU, float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if on.type == "cuda" else torch.float32
    return getattr(torch, name)


def batch_size(settings: DamSettings, lengths: Sequence[int]) -> int:
    """Sequences per expert per micro-batch: `auto` = about TOKENS_PER_EXPERT tokens, from
    the training examples' `lengths` (their mean), at least 1 and at most AUTO_BATCH_MAX."""
    if settings.batch_size != "auto":
        return settings.batch_size
    size = max(1, min(AUTO_BATCH_MAX, round(TOKENS_PER_EXPERT * len(lengths) / max(1, sum(lengths)))))
    LOG.info("dam: batch_size: auto is %d (training examples of %.0f tokens on average)", size, sum(lengths) / max(1, len(lengths)))
    return size


def teacher(settings: DamSettings, cache_size: int) -> str:
    """`teacher`: `auto` = `cached` when its `cache_size` (bytes, teachers.cache_bytes)
    fits CACHE_BUDGET_BYTES, else `online`."""
    if settings.teacher != "auto":
        return settings.teacher
    name = "cached" if cache_size <= CACHE_BUDGET_BYTES else "online"
    LOG.info("dam: teacher: auto is %s (the experts' logits at the scored tokens take %.2f GiB; cached up to %.0f GiB)",
             name, cache_size / 2**30, CACHE_BUDGET_BYTES / 2**30)
    return name


def recompute(setting: str, sharded: bool, peak: Callable[[str], int], available: Optional[int]) -> str:
    """The `recompute` mode a run uses: `auto` takes `weights` (no layer is run twice)
    when its estimated `peak` fits in 90% of the `available` memory (unknown: it fits),
    else `layer`; sharded runs use `layer` (a rebuilt weight would keep its layer's
    gathered experts from forward to backward)."""
    if setting == "weights" and sharded:
        raise DamError("dam: recompute: weights is for one process (sharded, it would keep every layer's gathered "
                       "experts until backward); use recompute: auto or layer")
    if setting != "auto":
        return setting
    if sharded:
        return "layer"
    return "weights" if available is None or peak("weights") <= 0.9 * available else "layer"


def packing(setting: str, worth_it: bool, on: torch.device, check: Callable[[], Tuple[bool, float]]) -> bool:
    """Whether training packs its micro-batches: `on`, or `auto` on a CPU where padding is
    a large share (`worth_it`), and then only if check() (packed and padded logits agree,
    and by how much) says the model keeps packed examples apart. `auto` pads on
    accelerators: there a small model's step is bound by the host, which packing adds to
    (on an H200 it made the lab's training 1.48x slower, where on a CPU it made it 1.81x
    faster; BENCHMARKS.md)."""
    if setting == "off" or (setting == "auto" and not worth_it):
        return False
    if setting == "auto" and on.type != "cpu":
        LOG.info("dam: packing: auto pads on %s (`packing: on` packs)", on.type)
        return False
    works, difference = check()
    if works:
        LOG.info("dam: packing: short examples share rows (packed and padded logits agree to %.1e)", difference)
    else:
        LOG.info("dam: packing: off, this model's packed logits differ from its padded ones by up to %.3g; examples are padded",
                 difference)
    return works


def lr(settings: DamSettings, probe: Optional[Callable[[], float]] = None) -> float:
    """`lr`; `auto` = probe()'s choice (end to end: lr_probe.choose_lr, which logs it), or
    without a probe (layer-wise stages have no validation KL) LAYERWISE_LR."""
    if settings.lr != "auto":
        return settings.lr
    if probe is None:
        LOG.info("dam: lr: auto is %g in layer-wise mode (no validation KL to probe against)", LAYERWISE_LR)
        return LAYERWISE_LR
    return probe()
