"""The training engine: learns the coefficients of one merge. It knows nothing of mergekit:
a `TrainingJob` (job.py) carries everything, built by the plugin at its boundary.

`run_job(job, key, artifact_path)` runs the job's mode (modes/) through the one training
loop (loop.py) and returns the coefficients and the report. The pieces: data.py and
packing.py (calibration data, splits, batches, order), experts.py (the experts on the
device), skeleton.py, expert_group.py, coefficients.py and merged_model.py (the merged
model over them), teachers.py and objective.py (targets and loss), lr_probe.py,
selection.py, schedule.py, checkpoint.py, estimate.py, evaluate.py, device.py,
distributed.py (FSDP2). Every `auto` setting is made concrete by core/auto.py.
"""

from __future__ import annotations

from mergekit_dam.training.job import TrainingJob, TrainingReport, TrainingResult


def run_job(job: TrainingJob, key: str, artifact_path: str) -> TrainingResult:
    """Learn the coefficients of `job` in its mode; `key` identifies the job for the
    checkpoint beside `artifact_path`."""
    from importlib import import_module

    import torch

    from mergekit_dam.core import auto
    from mergekit_dam.core.artifact import sidecar
    from mergekit_dam.training.device import out_of_memory
    from mergekit_dam.training.interrupts import stopping_on_signals

    mode = import_module(f"mergekit_dam.training.modes.{job.settings.mode}")
    try:
        with stopping_on_signals(sidecar(artifact_path, "checkpoint"), key):
            return mode.run(job, key, artifact_path)
    except torch.OutOfMemoryError:  # outside the steps (loading the experts, caching teachers, evaluating)
        raise out_of_memory(auto.device(job.settings.train_device), job.settings, "before or after the training steps") from None


__all__ = ["TrainingJob", "TrainingReport", "TrainingResult", "run_job"]
