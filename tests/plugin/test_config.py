"""Reading the raw `parameters:` blocks of a mergekit config (plugin/config.py), and the
example configs."""

import pytest
import yaml
from mergekit.config import MergeConfiguration

from mergekit_dam.core.errors import DamError
from mergekit_dam.plugin.config import check_merge_config


def normalised(config: dict) -> MergeConfiguration:
    """The shape MergePlanner.normalize_config leaves: modules -> slices -> sources."""
    models = config.pop("models")
    config["modules"] = {
        "default": {"slices": [{"sources": [{**m, "layer_range": [0, 2]} for m in models]}]}
    }
    return MergeConfiguration.model_validate({"merge_method": "dam", **config})


def test_reads_shared_and_per_model_settings():
    dam = check_merge_config(normalised({
        "models": [{"model": "a", "parameters": {"dataset": "a.jsonl", "text_field": "body"}}, {"model": "b"}],
        "parameters": {"steps": 5, "coefficients": "c.safetensors"},
    }))
    assert dam.settings.steps == 5 and dam.settings.coefficients == "c.safetensors"
    assert dam.models["a"].dataset == "a.jsonl" and dam.models["a"].text_field == "body"
    assert dam.models["b"].dataset == ""


@pytest.mark.parametrize(
    "config, message",
    [
        ({"models": [{"model": "a"}], "parameters": {"tempreature": 2}}, "did you mean `temperature`"),
        ({"models": [{"model": "a", "parameters": {"weight": 1}}]}, "unknown parameter `weight`"),
        ({"models": [{"model": "a"}], "parameters": {"train_device": ["cpu", "cuda"]}}, "must be a single value"),
        ({"models": [{"model": "a"}], "parameters": {"nonlinearity": "gelu"}}, "invalid value for `nonlinearity`"),
        ({"models": [{"model": "a"}], "parameters": {"batch_size": 0}}, "invalid value for `batch_size`"),
        ({"models": [{"model": "a"}], "parameters": {"temperature": -1}}, "invalid value for `temperature`"),
    ],
)
def test_rejections(config, message):
    with pytest.raises(DamError, match=message):
        check_merge_config(normalised(config))


def test_module_level_parameters_are_rejected():
    config = normalised({"models": [{"model": "a"}]})
    config.modules["default"].parameters = {"lr": 0.1}
    with pytest.raises(DamError, match="`lr` belongs in the top-level or a model's parameters"):
        check_merge_config(config)


def test_example_configs_are_valid():
    import glob
    import os

    import yaml

    root = os.path.join(os.path.dirname(__file__), "..", "..", "example_configs")
    files = sorted(glob.glob(os.path.join(root, "*.yml")))
    assert {os.path.basename(f) for f in files} >= {"dam.yml", "linear.yml", "ties.yml", "dare_ties.yml"}
    for file in files:
        raw = yaml.safe_load(open(file))
        MergeConfiguration.model_validate(raw)
        if raw["merge_method"] == "dam":
            raw = {k: v for k, v in raw.items() if k not in ("merge_method", "base_model", "dtype")}
            check_merge_config(normalised(raw))


def test_multi_stage_example_configs_are_valid():
    """example_configs/multi/: mergekit-multi files, one stage per YAML document."""
    import glob
    import os

    import yaml

    files = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "example_configs", "multi", "*.yml")))
    assert files
    for file in files:
        with open(file) as handle:
            stages = list(yaml.safe_load_all(handle))
        names = {stage.get("name") for stage in stages}
        assert any(stage["merge_method"] == "dam" for stage in stages), file
        for stage in stages:
            stage = {k: v for k, v in stage.items() if k != "name"}
            MergeConfiguration.model_validate(stage)
            assert stage["merge_method"] not in names, f"{file}: a stage named like a method refers to itself"
            if stage["merge_method"] == "dam":
                check_merge_config(normalised({k: v for k, v in stage.items() if k not in ("merge_method", "base_model", "dtype")}))


def test_lab_example_configs_match_the_demo():
    import os

    import yaml

    from mergekit_dam.lab.demo import merge_configs
    from mergekit_dam.lab import SKILLS

    root = "./dam-lab"  # "./": mergekit's model card would look "dam-lab/base" up on the hub
    manifest = {"base": f"{root}/base", "general_calibration": f"{root}/data/general.calibration.jsonl", "skills": {
        s: {"expert": f"{root}/expert_{s}", "calibration": f"{root}/data/{s}.calibration.jsonl"} for s in SKILLS}}
    here = os.path.join(os.path.dirname(__file__), "..", "..", "example_configs", "lab")
    for name, config in merge_configs(manifest, f"{root}/dam_coefficients.safetensors").items():
        with open(os.path.join(here, f"{name}.yml")) as handle:
            assert yaml.safe_load(handle) == config, name
