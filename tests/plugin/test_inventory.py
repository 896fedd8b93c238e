"""What one merge works on (plugin/inventory.py): its rows, and every tensor mergekit will
write, with the shape the checkpoints give it (read here with plain safetensors)."""

import pytest
from conftest import read_checkpoint
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions

from mergekit_dam.core.errors import DamError
from mergekit_dam.plugin import host
from mergekit_dam.plugin.inventory import merge_rows, plan_inventory


def context_of(config: dict):
    """The MergeContext of a config as mergekit's planner leaves it (a linear merge, so that
    planning it runs no DAM stage)."""
    planner = host.plan_merge(MergeConfiguration.model_validate(config), MergeOptions(quiet=True))
    return host.merge_context(planner)


def test_rows_are_the_inputs_but_the_base_unless_it_is_included():
    assert merge_rows(["a", "base", "b"], "base", include_base=False) == ["a", "b"]
    assert merge_rows(["a", "base", "b"], "base", include_base=True) == ["a", "base", "b"]
    assert merge_rows(["base"], "base", include_base=False) == ["base"]  # the base alone degenerates to the base


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_tensor_with_its_checkpoint_shape(families, arch):
    base, *experts = families[arch]
    context = context_of({"merge_method": "linear", "base_model": base, "dtype": "float32",
                          "models": [{"model": m, "parameters": {"weight": 1.0}} for m in experts]})
    inventory = plan_inventory(context, include_base=False)
    assert inventory.row_names == experts and str(inventory.base) == base
    weights = read_checkpoint(experts[0])
    assert {spec.name: spec.shape for spec in inventory.tensors} == {name: tuple(w.shape) for name, w in weights.items()}


def test_slices_that_do_not_cover_every_layer_are_rejected(families):
    _, *experts = families["llama"]
    context = context_of({"merge_method": "linear", "dtype": "float32",
                          "slices": [{"sources": [{"model": m, "layer_range": [0, 1], "parameters": {"weight": 1.0}} for m in experts[:2]]}]})
    with pytest.raises(DamError, match=r"the slices cover layers \[0, 1\) but .* has 2"):
        plan_inventory(context, include_base=False)
