"""The training engine: learns the coefficients of one merge.

`train(job, key, artifact_path)` runs the job's mode (modes/) through the one training
loop (loop.py) and returns the coefficients and the report (job.py). The pieces: data.py
(calibration data, splits, batches, order), experts.py and view.py (the experts on the
device and the merged model over them), teachers.py and objective.py (targets and loss),
schedule.py, checkpoint.py, estimate.py, evaluate.py, device.py, distributed.py (FSDP2).
"""

from __future__ import annotations

from mergekit_dam.training.job import TrainingJob, TrainingReport, TrainingResult


def train(job: TrainingJob, key: str, artifact_path: str) -> TrainingResult:
    """Learn the coefficients of `job` in its mode; `key` identifies the job for
    checkpoints next to `artifact_path`."""
    from importlib import import_module

    import torch

    from mergekit_dam.training.device import out_of_memory, resolve_device

    mode = import_module(f"mergekit_dam.training.modes.{job.settings.mode}")
    try:
        return mode.train(job, key, artifact_path)
    except torch.OutOfMemoryError:  # outside the steps (loading the experts, caching teachers, evaluating)
        raise out_of_memory(resolve_device(job.settings.train_device), job.settings, "before or after the training steps") from None


__all__ = ["TrainingJob", "TrainingReport", "TrainingResult", "train"]
