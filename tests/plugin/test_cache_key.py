"""The training key (plugin/cache_key.py): it changes with what decides what training
learns, in-place edits included, and not with where or how fast it runs."""

import os
import shutil

import pytest
from mergekit.common import ModelReference

from mergekit_dam.core.settings import DamSettings, ModelSettings
from mergekit_dam.plugin.cache_key import training_key
from mergekit_dam.plugin.inventory import Inventory


@pytest.fixture()
def merge(families, tmp_path):
    copies = [shutil.copytree(path, tmp_path / f"expert{index}") for index, path in enumerate(families["llama"][1:])]  # edited below
    rows = tuple(ModelReference.parse(str(path)) for path in copies)
    data = tmp_path / "data.txt"
    data.write_text("one line of text\n" * 20)
    inventory = Inventory(inputs=rows, base=None, rows=rows, tensors=())
    return inventory, {str(rows[0]): ModelSettings(dataset=str(data))}, data


def key(merge, **settings):
    inventory, data, _ = merge
    return training_key(DamSettings(**settings), inventory, data, inventory.rows[0], None)


def _edit_in_place(path, offset: int, byte: bytes) -> None:
    """Change one byte, keeping the size and the modification time."""
    stat = os.stat(path)
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(byte)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_the_key_is_stable_and_follows_what_training_learns(merge):
    assert key(merge) == key(merge)
    assert key(merge, lr=0.01) != key(merge) and key(merge, seed=1) != key(merge)
    for where in ({"train_device": "cpu"}, {"checkpoint_minutes": 1.0}, {"recompute": "layer"}, {"coefficients": "x"}):
        assert key(merge, **where) == key(merge), where


def test_an_in_place_edit_of_the_data_or_of_a_weight_file_changes_the_key(merge):
    before = key(merge)
    _edit_in_place(merge[2], 3, b"X")
    assert key(merge) != before
    edited = key(merge)
    weights = os.path.join(str(merge[0].rows[1]), "model.safetensors")
    _edit_in_place(weights, os.path.getsize(weights) - 1, b"\x7f")  # the last byte is in a sampled block
    assert key(merge) != edited
