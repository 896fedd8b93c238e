"""The one store of the pre-merge stage's decisions (plugin/prepared.py)."""

import gc

from mergekit_dam.core.settings import DamSettings
from mergekit_dam.plugin.prepared import CoefficientSource, PreparedMerges


class Planner:  # stands for mergekit's MergePlanner: hashable, weakly referenced
    pass


def test_a_decision_is_found_by_its_planner_by_what_a_kernel_sees_and_in_order():
    store, planner = PreparedMerges(), Planner()
    settings = DamSettings(seed=3)
    source = CoefficientSource(("a", "b"), "/w/c.safetensors")
    store.add(planner, settings, source)
    assert store.of(planner) is source and store.of(Planner()) is None
    assert store.for_kernel(settings, ["b", "a"]) is source  # rows in any order
    assert store.for_kernel(DamSettings(seed=4), ["a", "b"]) == CoefficientSource(("a", "b"), None)
    assert store.in_order == [source]


def test_without_a_decision_a_kernel_follows_the_coefficients_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = PreparedMerges().for_kernel(DamSettings(coefficients="c.safetensors"), ["a"])
    assert found == CoefficientSource(("a",), str(tmp_path / "c.safetensors"))


def test_the_store_does_not_keep_a_planner_alive():
    store, planner = PreparedMerges(), Planner()
    store.add(planner, DamSettings(), CoefficientSource(("a",), None))
    del planner
    gc.collect()
    assert len(store._by_planner) == 0 and len(store.in_order) == 1
