"""The training key: a content hash of everything that decides what training learns (the
models, the data, the tokenizer's chat template, the hyperparameters, the plugin's
version). An artifact whose `key` matches is reused instead of retrained; a checkpoint
resumes only under the same key. Also where trained artifacts go without a `coefficients`
path: the cache folder, by key."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict

from mergekit_dam.core.artifact import versions
from mergekit_dam.core.paths import is_local, resolve_path
from mergekit_dam.core.settings import DamSettings, ModelSettings
from mergekit_dam.plugin import host
from mergekit_dam.plugin.inventory import Inventory


# Settings that choose where or how fast training runs, not what it learns.
NOT_IN_KEY = ("coefficients", "retrain", "train_device", "train_dtype", "checkpoint_every", "checkpoint_minutes", "recompute", "processes")


def cache_dir() -> str:
    return resolve_path(os.environ.get("MERGEKIT_DAM_CACHE", "~/.cache/mergekit-dam"))


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
