"""The DAM section mergekit-dam adds to the model card mergekit writes."""

import json

from conftest import lab_dam_config
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge

FAST = {"steps": 4, "max_length": 24, "batch_size": 2, "samples": 16}


def test_a_trained_merge_card_says_how_to_reproduce_it(lab, tmp_path):
    artifact = tmp_path / "c.safetensors"
    run_merge(MergeConfiguration.model_validate(lab_dam_config(lab, artifact, **FAST)), str(tmp_path / "out"), MergeOptions(quiet=True))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## DAM: Differentiable Adaptive Merging" in card
    assert f"Coefficients: `{artifact}`" in card
    report = json.loads((tmp_path / "c.report.json").read_text())
    for expert, data in zip(lab["experts"], lab["data"]):
        start, final = report["held_out_kl"]["step_0_linear_average"][expert], report["held_out_kl"]["final"][expert]
        assert f"| `{expert}` | `{data}` | {start:.4f} → {final:.4f} |" in card
    assert f"Training: end_to_end, 4 steps, kept step {report['validation']['best_step']} by validation KL" in card
    assert card.count("## DAM") == 1

    # applying the artifact again (no training) keeps one section, pointing at the same file
    run_merge(MergeConfiguration.model_validate(lab_dam_config(lab, artifact, data=False)), str(tmp_path / "again"), MergeOptions(quiet=True))
    again = (tmp_path / "again" / "README.md").read_text()
    assert again.count("## DAM") == 1 and f"Coefficients: `{artifact}`" in again


def test_an_untrained_merge_card_says_equal_coefficients(lab, tmp_path):
    config = lab_dam_config(lab, "", data=False)
    del config["parameters"]["coefficients"]
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "out"), MergeOptions(quiet=True))
    assert "Coefficients: equal (1/N for every input: a linear average)" in (tmp_path / "out" / "README.md").read_text()
