import os

from conftest import SMALL_LAB

from mergekit_dam.lab import SKILLS
from mergekit_dam.lab.demo import run_demo


def test_demo_runs_six_merges_through_mergekit_yaml_and_mergekit_multi_and_compares(tmp_path):
    result = run_demo(str(tmp_path / "demo"), quiet=True, recipe=SMALL_LAB, dam_settings={"steps": 60})
    assert result["max_error"] < 1e-5
    assert result["merges"] == ["dam", "dam_retain", "linear", "task_arithmetic", "ties", "dare_ties"]
    assert set(result["seconds"]) == {"dam", "dam_retain", "simple merges"}
    for path in result["outputs"].values():
        assert os.path.getsize(path) > 0
    results = result["results"]
    assert set(result["merges"]) <= set(results)  # every merge scored, the one mergekit-multi run's four included
    for skill in SKILLS:  # DAM is trained to match each expert on its own data
        assert results["dam"][skill]["kl"] < results["linear"][skill]["kl"], skill
    assert set(results["dam"]["retention"]) == set(SKILLS)
    # retain_dataset keeps the base's general text: held-out general NLL closer to the base's
    base = results["base"]["general_nll"]
    assert abs(results["dam_retain"]["general_nll"] - base) < abs(results["dam"]["general_nll"] - base), (
        base, results["dam"]["general_nll"], results["dam_retain"]["general_nll"])
