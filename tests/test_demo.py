import os

from conftest import SMALL_LAB

from mergekit_dam.tools.demo import run_demo
from mergekit_dam.tools.lab import SKILLS


def test_demo_runs_five_merges_through_mergekit_yaml_and_compares(tmp_path):
    result = run_demo(str(tmp_path / "demo"), quiet=True, recipe=SMALL_LAB)
    assert result["max_error"] < 1e-5
    assert set(result["seconds"]) == {"dam", "linear", "task_arithmetic", "ties", "dare_ties"}
    for path in result["outputs"].values():
        assert os.path.getsize(path) > 0
    results = result["results"]
    for skill in SKILLS:  # DAM is trained to match each expert on its own data
        assert results["dam"][skill]["kl"] < results["linear"][skill]["kl"], skill
    assert set(results["dam"]["retention"]) == set(SKILLS)
