from mergekit_dam.demo import run_demo
from mergekit_dam.tiny import SKILLS


def test_demo_trains_inside_mergekit_yaml_and_beats_linear(tmp_path):
    result = run_demo(str(tmp_path / "demo"), quiet=True)
    assert result["max_error"] < 1e-5
    for skill in SKILLS:
        assert result["kl"]["dam"][skill] < 0.5 * result["kl"]["linear"][skill], skill
    assert (tmp_path / "demo" / "dam_coefficients.report.json").exists()
