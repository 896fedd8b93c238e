"""Every `auto` setting made concrete (core/auto.py), against the rule each one states."""

import pytest
import torch

from mergekit_dam.core import auto
from mergekit_dam.core.artifact import write_artifact
from mergekit_dam.core.errors import DamError
from mergekit_dam.core.settings import DamSettings
from mergekit_dam.training.data import Example, ExpertData
from mergekit_dam.training.teachers import TEACHERS, make_teacher


def logits_of(index, batch):
    return torch.zeros(*batch.ids.shape, 4)


def test_auto_recompute_keeps_activations_only_where_they_fit():
    peaks = {"weights": 100, "layer": 40, "none": 130}
    assert auto.recompute("auto", False, peaks.get, available=120) == "weights"
    assert auto.recompute("auto", False, peaks.get, available=105) == "layer"  # 90% margin
    assert auto.recompute("auto", False, peaks.get, available=None) == "weights"
    assert auto.recompute("auto", True, peaks.get, available=10**9) == "layer"
    assert auto.recompute("none", False, peaks.get, available=1) == "none"
    with pytest.raises(DamError, match="recompute: weights is for one process"):
        auto.recompute("weights", True, peaks.get, available=None)


@pytest.mark.parametrize("lengths, expected", [([16] * 10, 16), ([2048] * 3, 1), ([300, 212], 1), ([2] * 50, 64), ([10, 22], 16)])
def test_batch_size_auto_takes_about_256_tokens_per_expert(lengths, expected):
    data = ExpertData(experts=[0, 1], train={0: [Example([1] * n) for n in lengths], 1: [Example([1] * n) for n in lengths]},
                      held_out={0: [], 1: []}, pad_id=0)
    assert auto.batch_size(DamSettings(), data.train_lengths()) == expected
    assert auto.batch_size(DamSettings(batch_size=3), data.train_lengths()) == 3  # an explicit value is kept


@pytest.mark.parametrize("size, expected", [(0, "cached"), (auto.CACHE_BUDGET_BYTES, "cached"),
                                            (auto.CACHE_BUDGET_BYTES + 1, "online")])
def test_auto_caches_within_the_budget(size, expected, caplog):
    caplog.set_level("INFO", logger="mergekit_dam")
    name = auto.teacher(DamSettings(), size)
    teacher = make_teacher(DamSettings(teacher=name), logits_of, torch.device("cpu"))
    assert name == expected and type(teacher) is TEACHERS[expected]
    assert f"teacher: auto is {expected}" in caplog.text


def test_an_explicit_teacher_is_kept_whatever_the_size():
    assert auto.teacher(DamSettings(teacher="online"), 0) == "online"
    assert auto.teacher(DamSettings(teacher="topk"), auto.CACHE_BUDGET_BYTES + 1) == "topk"


def test_device_auto_is_the_cpu_without_a_gpu_and_bad_names_are_one_line():
    if not torch.cuda.is_available():
        assert auto.device("auto") == torch.device("cpu")
        with pytest.raises(DamError, match="no CUDA GPU is available; use train_device: cpu"):
            auto.device("cuda")
    assert auto.device("cpu") == torch.device("cpu")
    with pytest.raises(DamError, match="train_device `gpu0` is not a device"):
        auto.device("gpu0")
    with pytest.raises(DamError, match="train_device `meta` is not supported"):
        auto.device("meta")


def test_dtype_auto_is_bfloat16_on_a_gpu_and_float32_on_a_cpu():
    assert auto.dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert auto.dtype("auto", torch.device("cpu")) == torch.float32
    assert auto.dtype("float16", torch.device("cpu")) == torch.float16


def test_parametrization_auto_trains_task_vectors_with_a_base_and_data(caplog):
    caplog.set_level("INFO", logger="mergekit_dam")
    assert auto.parametrization(DamSettings(), "base", trains=True, log=True).parametrization == "task_vectors"
    assert "parametrization: auto is task_vectors (a base_model and data to train)" in caplog.text
    assert auto.parametrization(DamSettings(), "base", trains=False).parametrization == "weights"
    assert auto.parametrization(DamSettings(), None, trains=True).parametrization == "weights"
    assert auto.parametrization(DamSettings(parametrization="weights"), "base", trains=True).parametrization == "weights"
    with pytest.raises(DamError, match="needs a `base_model:`"):
        auto.parametrization(DamSettings(parametrization="task_vectors"), None, trains=True)


def test_an_artifact_on_disk_keeps_the_parametrization_it_was_trained_with(tmp_path):
    path = str(tmp_path / "c.safetensors")
    write_artifact(path, {"w": torch.ones(2, 3)}, ["a", "b"], {"settings": {"parametrization": "weights"}})
    kept = DamSettings(coefficients=path)
    assert auto.parametrization(kept, "base", trains=True).parametrization == "weights"
    assert auto.parametrization(kept.model_copy(update={"retrain": True}), "base", trains=True).parametrization == "task_vectors"
    bare = str(tmp_path / "bare.safetensors")  # no provenance: a base row means task vectors
    write_artifact(bare, {"w": torch.ones(3, 3)}, ["a", "b", "base"])
    assert auto.parametrization(DamSettings(coefficients=bare), "base", trains=True).parametrization == "task_vectors"


def test_lr_auto_is_the_probe_s_choice_or_the_layerwise_rate():
    assert auto.lr(DamSettings(lr=0.05), probe=lambda: 1.0) == 0.05
    assert auto.lr(DamSettings(), probe=lambda: 0.3) == 0.3
    assert auto.lr(DamSettings()) == auto.LAYERWISE_LR


def test_packing_auto_packs_on_a_cpu_only_where_worth_it_and_only_if_the_check_agrees():
    cpu, gpu, checks = torch.device("cpu"), torch.device("cuda"), []

    def agrees():
        checks.append(1)
        return True, 0.0

    assert auto.packing("auto", True, cpu, agrees) and len(checks) == 1
    assert not auto.packing("auto", False, cpu, agrees) and not auto.packing("auto", True, gpu, agrees) and len(checks) == 1
    assert auto.packing("on", False, gpu, agrees) and len(checks) == 2
    assert not auto.packing("on", True, cpu, lambda: (False, 1.0))
    assert not auto.packing("off", True, cpu, agrees) and len(checks) == 2


def test_resolved_settings_carry_the_choices_and_report_them_as_plain_values():
    resolved = auto.Resolved(train_device=torch.device("cpu"), train_dtype=torch.bfloat16, batch_size=4, teacher="cached", lr=0.01)
    settings = resolved.settings(DamSettings())
    assert (settings.batch_size, settings.teacher, settings.lr) == (4, "cached", 0.01)
    assert settings.train_device == "auto"  # where training runs is not a setting to rewrite
    assert resolved.report() == {"train_device": "cpu", "train_dtype": "bfloat16", "batch_size": 4, "teacher": "cached", "lr": 0.01}
