"""Getting one merge's trained coefficients: reuse a matching artifact, or train, in this
process or in `processes` processes launched with torchrun, and write the artifact and its
report. The one place the plugin reaches the training engine: it builds the training job
from what mergekit knows (the job carries everything; training imports nothing of the
plugin) and writes what the engine returns.

Training runs at most once per artifact: a file lock serialises processes, and an artifact
whose `key` (cache_key.py) matches is reused instead of retrained.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from typing import Optional

from mergekit_dam.core.artifact import open_artifact, sidecar, write_artifact
from mergekit_dam.core.atomic import atomic_write_text
from mergekit_dam.core.errors import DamError
from mergekit_dam.core.settings import DamSettings
from mergekit_dam.plugin import host
from mergekit_dam.plugin.cache_key import cache_dir, training_key
from mergekit_dam.plugin.host import MergeContext
from mergekit_dam.plugin.inventory import Inventory
from mergekit_dam.plugin.prepared import PREPARED
from mergekit_dam.plugin.tokenizer import load_tokenizer
from mergekit_dam.training import TrainingJob, distributed, run_job

LOG = logging.getLogger("mergekit_dam")


def trained_coefficients(context: MergeContext, dam, inventory: Inventory, data, path: Optional[str]) -> str:
    """The path of coefficients trained for exactly this merge: reused, or trained now."""
    skeleton_model = inventory.base or inventory.rows[0]
    show_progress_logs(context.quiet)
    key = training_key(dam.settings, inventory, data, skeleton_model, context.config.chat_template)
    path = path or os.path.join(cache_dir(), key[:20], "coefficients.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    import filelock

    # One lock per artifact path, kept in the cache directory so no stray files land
    # next to the user's artifact. A sharded run's processes are one job: rank 0 locks
    # (the others wait for it in their first collective) and writes.
    lock_path = os.path.join(cache_dir(), "locks", hashlib.sha256(path.encode()).hexdigest()[:32] + ".lock")
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    main = distributed.is_main()
    with filelock.FileLock(lock_path) if main else contextlib.nullcontext():
        if PREPARED.trained.get(key) == path and os.path.exists(path):
            LOG.info("dam: coefficients %s were trained earlier in this process (no training)", path)
            return path
        if os.path.exists(path) and not dam.settings.retrain:
            existing = open_artifact(path)
            if existing.metadata.get("key") == key:
                existing.check(inventory.row_names, inventory.tensors)
                LOG.info("dam: reusing coefficients %s (trained for this exact config; no training)", path)
                return path
            LOG.info("dam: %s was trained for other models, data or hyperparameters: retraining", path)
        if dam.settings.processes == 1 or distributed.launched():
            return train_in_process(context, dam, inventory, data, key, path, main)
    # outside the lock: the launched processes' rank 0 takes it
    return train_with_torchrun(context, dam.settings, key, path)


def show_progress_logs(quiet: bool) -> None:
    """mergekit-yaml logs at WARNING unless -v; training is long and its summary (inputs,
    coefficient count, memory estimate, held-out KL) belongs on screen unless --quiet."""
    if quiet or LOG.getEffectiveLevel() <= logging.INFO:
        return
    LOG.setLevel(logging.INFO)  # mergekit's root handler (level NOTSET) then prints our records
    if not logging.getLogger().handlers and not LOG.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(handler)


def train_with_torchrun(context: MergeContext, settings: DamSettings, key: str, path: str) -> str:
    """Train in `settings.processes` processes: torchrun runs `mergekit-dam train` on this
    config (sharded, see training/distributed.py); this process then applies what they wrote."""
    import subprocess
    import sys
    import tempfile

    import yaml

    config = context.config.model_dump(mode="json", exclude_none=True)
    config["parameters"] = {**(config.get("parameters") or {}), "coefficients": path}
    flags = (["-q"] if context.quiet else [])
    train_flags = (["--trust-remote-code"] if context.trust_remote_code else [])
    for flag, value in (("--transformers-cache", context.transformers_cache), ("--lora-merge-cache", context.lora_merge_cache)):
        if value:
            train_flags += [flag, value]
    with tempfile.TemporaryDirectory(dir=cache_dir()) as folder:
        config_path = os.path.join(folder, "dam.yml")
        with open(config_path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(config, handle, sort_keys=False)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(settings.processes),
                   "-m", "mergekit_dam.cli", *flags, "train", config_path, *train_flags]
        LOG.info("dam: training in %d processes: %s", settings.processes, " ".join(command))
        returncode = subprocess.run(command).returncode
    if returncode != 0:
        raise DamError(
            f"dam: sharded training in {settings.processes} processes failed (exit code {returncode}; its messages are "
            "above); fix what they report, or train in one process (processes: 1)"
        )
    if not os.path.exists(path) or open_artifact(path).metadata.get("key") != key:
        raise DamError(f"dam: the {settings.processes} training processes did not write coefficients for this config at {path}")
    PREPARED.trained[key] = path
    return path


def training_job(context: MergeContext, dam, inventory: Inventory, data) -> TrainingJob:
    """The engine's job for this merge: its rows, tensors, data and settings, a reader of
    each row's checkpoint tensors, the output config and the tokenizer."""
    settings = dam.settings
    return TrainingJob(
        rows=inventory.row_names,
        readers=[functools.partial(host.tensor_loader(model).get_tensor, device="cpu") for model in inventory.rows],
        tensors=inventory.tensors,
        data=data,
        settings=settings,
        out_config=context.out_config,
        tokenizer=load_tokenizer(inventory.base or inventory.rows[0], inventory.rows, context.config, context.trust_remote_code),
        trust_remote_code=context.trust_remote_code,
        quiet=context.quiet,
        base_row=inventory.row_names.index(str(inventory.base)) if settings.parametrization == "task_vectors" else None,
        retain_row=str(inventory.base) if settings.retain_dataset else None,
    )


def train_in_process(context: MergeContext, dam, inventory: Inventory, data, key: str, path: str, main: bool) -> str:
    """Train here (one rank of a sharded launch, or alone), then (rank 0) write the
    artifact and its report, atomically."""
    result = run_job(training_job(context, dam, inventory, data), key, path)
    if not main:
        distributed.barrier()  # rank 0 is writing the artifact
        return path
    report = result.report
    final = report.loss_curve[-1]["loss"] if report.loss_curve else None
    write_artifact(path, result.coefficients, inventory.row_names, {
        "key": key,
        "settings": dam.settings.model_dump(exclude={"coefficients", "retrain"}),
        "datasets": {row: settings.model_dump() for row, settings in data.items()},
        "steps": report.steps,
        "loss": final,
        "held_out_kl": report.held_out_kl,
        "device": report.device,
    }, rows_complement=str(inventory.base) if dam.settings.parametrization == "task_vectors" else None)
    report_path = sidecar(path, "report")
    atomic_write_text(report_path, json.dumps(report.to_dict(), indent=1))
    LOG.info("dam: wrote %s and %s", path, report_path)
    PREPARED.trained[key] = path
    distributed.barrier()
    return path
