"""The pre-merge stage: decide, before mergekit runs a single task, where every tensor's
coefficients come from (an artifact, training, or equal weights), train if needed, and
fail early (nothing written) when they cannot be had.

mergekit 0.1.5 gives a merge method no planning hook and no view of the whole config.
Its planner does call `method.validate_inputs` once per output slice right after
normalising the config, before any tensor task exists; `DamMerge.validate_inputs`
hands `prepare` the planner's MergeContext (host.py: the normalised config, output
config and the options DAM reads). The kernels then find the decision in
`_PREPARED`, keyed by what each kernel call can see (settings + input names).

Training runs at most once per artifact: a file lock serialises processes, and an
artifact whose `key` (content hash of models, data, tokenizer, hyperparameters and
plugin version) matches is reused instead of retrained.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from mergekit_dam.atomic import atomic_write_text
from mergekit_dam.plugin import host
from mergekit_dam.plugin.artifact import open_artifact, versions, write_artifact
from mergekit_dam.plugin.config import (
    DamError,
    DamSettings,
    ModelSettings,
    check_merge_config,
    resolve_path,
)
from mergekit_dam.plugin.host import MergeContext
from mergekit_dam.plugin.inventory import Inventory, plan_inventory
from mergekit_dam.training import distributed
from mergekit_dam.training.data import is_local

LOG = logging.getLogger("mergekit_dam")

# Settings that choose where or how fast training runs, not what it learns.
NOT_IN_KEY = ("coefficients", "retrain", "train_device", "train_dtype", "checkpoint_every", "checkpoint_minutes", "recompute", "processes")


@dataclass(frozen=True)
class CoefficientSource:
    """Where one merge's coefficients come from: an artifact, or equal weights 1/N."""

    rows: Tuple[str, ...]
    artifact_path: Optional[str]  # None = equal coefficients


_PREPARED: Dict[Tuple[str, Tuple[str, ...]], CoefficientSource] = {}
PREPARED_IN_ORDER: List[CoefficientSource] = []  # every source this process prepared (the model card reads them)
_TRAINED: Dict[str, str] = {}  # training key -> artifact written by this process
_LOCK = threading.RLock()


def _key(settings: DamSettings, rows: Sequence[str]) -> Tuple[str, Tuple[str, ...]]:
    return settings.model_dump_json(), tuple(sorted(rows))


def cache_dir() -> str:
    return resolve_path(os.environ.get("MERGEKIT_DAM_CACHE", "~/.cache/mergekit-dam"))


# --- the training key -----------------------------------------------------------------


SAMPLED_BLOCKS, BLOCK_BYTES = 64, 1 << 16


def _sampled_content(path: str, size: int, digest) -> None:
    """64 blocks of 64 KiB spread evenly over the file: an in-place edit that keeps the
    size and the modification time still changes the key unless it avoids all of them."""
    with open(path, "rb") as handle:
        for index in range(SAMPLED_BLOCKS):
            handle.seek(index * max(0, size - BLOCK_BYTES) // max(1, SAMPLED_BLOCKS - 1))
            digest.update(handle.read(BLOCK_BYTES))


def _model_fingerprint(model, digest) -> None:
    """Config and tokenizer files by content; weight files by name, size, mtime,
    safetensors header and sampled content (hashing every byte of a 70B checkpoint
    would take minutes)."""
    index = host.tensor_loader(model).index
    base = index.base_path
    for name in sorted(set(index.tensor_paths.values())):
        path = os.path.join(base, name)
        stat = os.stat(path)
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        if name.endswith(".safetensors"):
            with open(path, "rb") as handle:
                header_length = int.from_bytes(handle.read(8), "little")
                digest.update(handle.read(min(header_length, 100_000_000)))
        _sampled_content(path, stat.st_size, digest)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja"):
        if os.path.exists(os.path.join(base, name)):
            with open(os.path.join(base, name), "rb") as handle:
                digest.update(name.encode() + handle.read())


def _file_content(path: str, digest) -> None:
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


def _data_fingerprint(settings: ModelSettings, digest) -> None:
    digest.update(settings.model_dump_json().encode())
    if is_local(settings.dataset) and os.path.isfile(resolve_path(settings.dataset)):
        _file_content(resolve_path(settings.dataset), digest)


def training_key(settings: DamSettings, inventory: Inventory, data: Dict[str, ModelSettings], skeleton_model, chat_template) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(versions()["mergekit-dam"]).encode())
    digest.update(json.dumps(settings.model_dump(exclude=set(NOT_IN_KEY)), sort_keys=True).encode())
    digest.update(json.dumps([str(chat_template)]).encode())
    for model in inventory.rows:
        digest.update(str(model).encode())
        _model_fingerprint(model, digest)
    if skeleton_model not in inventory.rows:
        _model_fingerprint(skeleton_model, digest)
    for row in inventory.row_names:
        if row in data:
            _data_fingerprint(data[row], digest)
    if settings.init_from and os.path.isfile(resolve_path(settings.init_from)):  # a warm start: its content matters
        _file_content(resolve_path(settings.init_from), digest)
    return digest.hexdigest()


# --- tokenizer --------------------------------------------------------------------


def load_tokenizer(skeleton_model, rows: Sequence[object], config, trust_remote_code: bool):
    """The skeleton model's tokenizer; every input's tokenizer (where it has one) must
    have the same vocabulary, because one token sequence feeds all of them."""
    from transformers import AutoTokenizer

    def load(model):
        return AutoTokenizer.from_pretrained(model.model.path, revision=model.model.revision, trust_remote_code=trust_remote_code)

    try:
        tokenizer = load(skeleton_model)
    except Exception as error:
        raise DamError(f"dam: cannot load the tokenizer of {skeleton_model} ({error}); DAM training needs one") from None
    vocabulary = tokenizer.get_vocab()
    for model in rows:
        if model == skeleton_model:
            continue
        try:
            other = load(model).get_vocab()
        except Exception:
            continue  # no tokenizer files: the embedding shapes were already checked
        if other != vocabulary:
            raise DamError(
                f"dam: {model} has a different vocabulary than {skeleton_model} ({len(other)} vs {len(vocabulary)} "
                "tokens); DAM feeds one token sequence to every input, so their tokenizers must agree"
            )
    if config.chat_template:
        host.set_chat_template(tokenizer, config)
    return tokenizer


# --- the decision ----------------------------------------------------------------


def _show_progress_logs(quiet: bool) -> None:
    """mergekit-yaml logs at WARNING unless -v; training is long and its summary (inputs,
    coefficient count, memory estimate, held-out KL) belongs on screen unless --quiet."""
    if quiet or LOG.getEffectiveLevel() <= logging.INFO:
        return
    LOG.setLevel(logging.INFO)  # mergekit's root handler (level NOTSET) then prints our records
    if not logging.getLogger().handlers and not LOG.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(handler)


def _train(context: MergeContext, dam, inventory: Inventory, data, path: Optional[str]) -> str:
    skeleton_model = inventory.base or inventory.rows[0]
    _show_progress_logs(context.quiet)
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
        if _TRAINED.get(key) == path and os.path.exists(path):
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
            return _train_here(context, dam, inventory, data, key, path, skeleton_model, main)
    # outside the lock: the launched processes' rank 0 takes it
    return _launch(context, dam.settings, key, path)


def _launch(context: MergeContext, settings: DamSettings, key: str, path: str) -> str:
    """Train in `settings.processes` processes: torchrun runs `mergekit-dam train` on this
    config (sharded, see distributed.py); this process then applies what they wrote."""
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
    _TRAINED[key] = path
    return path


def _train_here(context: MergeContext, dam, inventory: Inventory, data, key: str, path: str, skeleton_model, main: bool) -> str:
    from mergekit_dam.training import TrainingJob, train

    job = TrainingJob(
        rows=inventory.row_names,
        models=list(inventory.rows),
        tensors=inventory.tensors,
        data=data,
        settings=dam.settings,
        out_config=context.out_config,
        tokenizer=load_tokenizer(skeleton_model, inventory.rows, context.config, context.trust_remote_code),
        trust_remote_code=context.trust_remote_code,
        quiet=context.quiet,
        base_row=inventory.row_names.index(str(inventory.base)) if dam.settings.parametrization == "task_vectors" else None,
        retain_row=str(inventory.base) if dam.settings.retain_dataset else None,
    )
    result = train(job, key, path)
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
    })
    report_path = report_path_of(path)
    atomic_write_text(report_path, json.dumps(report.to_dict(), indent=1))
    LOG.info("dam: wrote %s and %s", path, report_path)
    _TRAINED[key] = path
    distributed.barrier()
    return path


def report_path_of(artifact_path: str) -> str:
    return os.path.splitext(artifact_path)[0] + ".report.json"


def retain_row(settings: DamSettings, inventory: Inventory, data) -> str:
    """The row whose logits `retain_dataset` keeps: the base's, which needs a row."""
    base = str(inventory.base) if inventory.base is not None else None
    if base is None or base not in inventory.row_names:
        raise DamError("dam: `retain_dataset` keeps the merge close to the base model, which needs a `base_model:` with a row "
                       "of coefficients (parametrization: task_vectors, the default with a base, or include_base: true)")
    if base in data:
        raise DamError(f"dam: the base model {base} has a `dataset:` and `retain_dataset` is set: both would be its data; "
                       "keep one")
    return base


def decide(context: MergeContext, dam, inventory: Inventory) -> CoefficientSource:
    settings = dam.settings
    rows = tuple(inventory.row_names)
    path = resolve_path(settings.coefficients) if settings.coefficients else None
    data = {row: dam.models[row] for row in rows if row in dam.models and dam.models[row].dataset}
    if data and settings.retain_dataset:
        data[retain_row(settings, inventory, data)] = ModelSettings(dataset=settings.retain_dataset)
    if data:
        return CoefficientSource(rows, _train(context, dam, inventory, data, path))
    if settings.retrain:
        raise DamError("dam: `retrain: true` needs at least one input model with a `dataset:` to train on")
    if path and os.path.exists(path):
        open_artifact(path).check(rows, inventory.tensors)
        LOG.info("dam: applying coefficients from %s (no datasets configured: no training)", path)
        return CoefficientSource(rows, path)
    if path:
        raise DamError(
            f"dam: coefficients file {path} does not exist and no input model has a `dataset` to learn "
            "coefficients from; fix the path, or add a `dataset:` to the experts' parameters"
        )
    LOG.info("dam: no coefficients and no datasets: equal coefficients 1/%d (a linear average)", len(rows))
    return CoefficientSource(rows, None)


def resolve_parametrization(settings: DamSettings, base: Optional[object], trains: bool) -> DamSettings:
    """`parametrization: auto` made concrete for one merge; the same answer in the stage
    and in every kernel call, since it reads only the config and the artifact on disk.
    An existing artifact that will not be retrained keeps the parametrization it was
    trained with (its provenance; a file without one: a base row means task vectors), so
    that artifacts written before `auto` apply and reuse as they did. Otherwise task
    vectors when there is a base and something to train, else weights: equal
    coefficients stay the experts' linear average."""
    if settings.parametrization != "auto":
        choice = settings.parametrization
    elif base is None:
        choice = "weights"
    else:
        path = resolve_path(settings.coefficients) if settings.coefficients else None
        if path and os.path.exists(path) and not settings.retrain:
            artifact = open_artifact(path)
            trained_with = (artifact.provenance("settings") or {}).get("parametrization")
            rows_say = "task_vectors" if str(base) in artifact.models and not settings.include_base else "weights"
            choice = trained_with if trained_with in ("weights", "task_vectors") else rows_say
        else:
            choice = "task_vectors" if trains else "weights"
    if choice == "task_vectors" and base is None:
        raise DamError("dam: `parametrization: task_vectors` merges task vectors W_i - W_base and needs a `base_model:`; "
                       "set one or use parametrization: weights")
    if choice == "weights" and settings.init_weight is not None:
        raise DamError("dam: `init_weight` starts task vectors, which need a `base_model:` and something to train; "
                       "set both or drop init_weight")
    return settings.model_copy(update={"parametrization": choice})


def prepare(context: MergeContext) -> CoefficientSource:
    """Run the pre-merge stage of one mergekit merge (its config already normalised)."""
    dam = check_merge_config(context.config)
    trains = any(model.dataset for model in dam.models.values())
    dam = dam.model_copy(update={"settings": resolve_parametrization(dam.settings, context.config.base_model, trains)})
    with _LOCK:
        inventory = plan_inventory(context, dam.settings.base_row)
        source = decide(context, dam, inventory)
        _PREPARED[_key(dam.settings, source.rows)] = source
        PREPARED_IN_ORDER.append(source)
    return source


def source_for(settings: DamSettings, rows: Sequence[str]) -> CoefficientSource:
    """The coefficient source a kernel call should use.

    Prepared by `prepare` in mergekit runs; for direct Python API calls
    (`merge_state_dicts`, `merge_tensors`) it follows the `coefficients` setting.
    """
    with _LOCK:
        prepared = _PREPARED.get(_key(settings, rows))
    if prepared is not None:
        return prepared
    if settings.coefficients:
        return CoefficientSource(tuple(rows), resolve_path(settings.coefficients))
    return CoefficientSource(tuple(rows), None)
