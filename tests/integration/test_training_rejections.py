"""Inputs training cannot use are rejected with one line before anything is written."""

import logging
import shutil

import pytest
from conftest import lab_config, merge, small_lab

from mergekit_dam.api import train as train_stage
from mergekit_dam.core.errors import DamError
from mergekit_dam.lab.tiny import make_tokenizer


def _reject(config, tmp_path, message):
    with pytest.raises(DamError, match=message):
        merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize(
    "dataset, content, message",
    [
        ("missing.jsonl", None, "does not exist"),
        ("empty.jsonl", "", "cannot load dataset|is empty"),
        ("fields.jsonl", '{"title": "x"}\n', "found: title"),
    ],
)
def test_bad_data_writes_nothing(lab, tmp_path, dataset, content, message):
    if content is not None:
        (tmp_path / dataset).write_text(content)
    config = lab_config(lab, tmp_path / "c.safetensors")
    config["models"][1]["parameters"]["dataset"] = str(tmp_path / dataset)
    _reject(config, tmp_path, message)


def test_vocabulary_mismatch_is_rejected(lab, tmp_path):
    other = tmp_path / "other_expert"
    shutil.copytree(lab["experts"][2], other)
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(str(other))
    config = lab_config(lab, tmp_path / "c.safetensors")
    config["models"][2]["model"] = str(other)
    _reject(config, tmp_path, "different vocabulary")


def test_non_finite_loss_stops_with_step_and_hint(lab, tmp_path):
    _reject(lab_config(lab, tmp_path / "c.safetensors", lr=1e30, grad_clip=0), tmp_path, r"loss became (nan|inf) at step \d+; lower `lr`")


def test_shape_mismatch_between_inputs_is_rejected(lab, tmp_path):
    wide = small_lab(tmp_path / "wide", hidden=48, pretrain_steps=1, finetune_steps=1)
    config = lab_config(lab, tmp_path / "c.safetensors")
    config["models"][2]["model"] = wide["experts"][2]
    _reject(config, tmp_path, "different shapes across inputs")


def test_architecture_mismatch_is_rejected(lab, families, tmp_path):
    config = lab_config(lab, tmp_path / "c.safetensors")
    config["models"][2]["model"] = families["qwen2"][1]
    with pytest.raises(RuntimeError, match="allow-crimes"):
        merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("change, message", [
    ({"parametrization": "weights"}, "`retain_dataset` keeps the merge close to the base model, which needs a `base_model:` with a row"),
    ({"mode": "layerwise"}, "retain_dataset is supported with mode: end_to_end"),
])
def test_retain_dataset_without_a_base_row_is_one_line(lab, tmp_path, change, message):
    _reject(lab_config(lab, tmp_path / "c.safetensors", retain_dataset=lab["general"], **change), tmp_path, message)


def test_max_length_beyond_the_model_positions_is_cut_with_a_warning(lab, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mergekit_dam"):
        train_stage(lab_config(lab, tmp_path / "c.safetensors", max_length=100_000, steps=2))
    assert "max_length 100000 exceeds the model's max_position_embeddings 256; examples are cut at 256" in caplog.text


def test_init_weight_without_a_base_is_one_line(lab, tmp_path):
    config = lab_config(lab, tmp_path / "c.safetensors", init_weight=0.5)
    del config["base_model"]
    _reject(config, tmp_path, "`init_weight` starts task vectors, which need a `base_model:`")


def test_task_vectors_need_a_base_model(lab, tmp_path):
    config = lab_config(lab, tmp_path / "c.safetensors", parametrization="task_vectors")
    del config["base_model"]
    _reject(config, tmp_path, "parametrization: task_vectors.*needs a `base_model:`")
