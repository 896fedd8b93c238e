"""The experts on the training device (training/experts.py): stacks read through the job's
readers, a warm start's tables, and which tensors learn."""

from types import SimpleNamespace

import pytest
import torch

from mergekit_dam.core.artifact import write_artifact
from mergekit_dam.core.errors import DamError
from mergekit_dam.core.settings import DamSettings
from mergekit_dam.core.tensor_spec import TensorSpec
from mergekit_dam.training.experts import ExpertStacks, trains, warm_start

WEIGHTS = {"a": {"w": torch.ones(2, 3), "tied": torch.zeros(3)}, "b": {"w": 2 * torch.ones(2, 3), "t2": torch.ones(3)}}


def job(**settings):
    return SimpleNamespace(rows=["a", "b"], readers=[WEIGHTS["a"].__getitem__, WEIGHTS["b"].__getitem__],
                           tensors=[TensorSpec("w", (2, 3), ("w", "w")), TensorSpec("n", (3,), ("tied", "t2"))],
                           settings=DamSettings(**settings))


def test_stacks_hold_each_row_s_tensor_under_its_own_source_name():
    stacks = ExpertStacks(job(), torch.device("cpu"), torch.float32)
    assert list(stacks) == ["w", "n"] and len(stacks) == 2
    assert torch.equal(stacks["w"], torch.stack([torch.ones(2, 3), 2 * torch.ones(2, 3)]))
    assert torch.equal(stacks["n"], torch.stack([torch.zeros(3), torch.ones(3)]))


def test_a_non_finite_expert_is_named():
    broken = job()
    broken.readers = [broken.readers[0], lambda name: torch.full((2, 3), float("nan")) if name == "w" else torch.ones(3)]
    with pytest.raises(DamError, match="dam: b has NaN or Inf values in tensor w"):
        ExpertStacks(broken, torch.device("cpu"), torch.float32)["w"]


def test_a_warm_start_reads_its_rows_by_name_and_checks_the_columns(tmp_path):
    path = str(tmp_path / "start.safetensors")
    write_artifact(path, {"w": torch.tensor([[0.1, 0.2, 0.3], [0.9, 0.8, 0.7]]), "n": torch.ones(2, 2)}, ["b", "a"])
    start = warm_start(job(init_from=path))
    assert torch.equal(start("w"), torch.tensor([[0.9, 0.8, 0.7], [0.1, 0.2, 0.3]]))
    with pytest.raises(DamError, match="init_from .* has 2 columns for n, the tensor 3"):
        start("n")
    assert warm_start(job()) is None


def test_linear_layers_always_learn_embeddings_and_norms_when_asked():
    assert trains("linear", DamSettings(train_embeddings=False, train_norms=False))
    assert trains("embedding", DamSettings()) and not trains("embedding", DamSettings(train_embeddings=False))
    assert trains("norm", DamSettings()) and not trains("norm", DamSettings(train_norms=False))
