import typing

import pytest
import yaml
from mergekit.config import MergeConfiguration

from mergekit_dam.core.errors import DamError
from mergekit_dam.core.settings import DamSettings, ModelSettings, parse_settings
from mergekit_dam.core.settings_table import README_TABLES, readme_tables, settings_table
from mergekit_dam.plugin.config import check_merge_config


def normalised(config: dict) -> MergeConfiguration:
    """The shape MergePlanner.normalize_config leaves: modules -> slices -> sources."""
    models = config.pop("models")
    config["modules"] = {
        "default": {"slices": [{"sources": [{**m, "layer_range": [0, 2]} for m in models]}]}
    }
    return MergeConfiguration.model_validate({"merge_method": "dam", **config})


def test_defaults_follow_the_reference_where_they_need_no_tuning():
    settings = DamSettings()
    assert (settings.temperature, settings.similarity_weight, settings.grad_clip) == (2.0, 0.01, 1.0)
    assert (settings.lr, settings.batch_size, settings.min_steps, settings.parametrization) == ("auto", "auto", 560, "auto")
    assert (settings.schedule, settings.packing, settings.balance) == ("cosine", "auto", 0.0)
    assert (settings.l1_weight, settings.l2_weight, settings.topk, settings.max_length) == (0.0, 0.0, 128, 2048)
    assert settings.train_embeddings and settings.train_norms and not settings.include_base


@pytest.mark.parametrize("name, value", [("lr", 0), ("lr", -1e-3), ("lr", "fast"), ("batch_size", 0), ("batch_size", 1.5), ("batch_size", "big")])
def test_lr_and_batch_size_are_positive_numbers_or_auto(name, value):
    with pytest.raises(DamError, match=f"invalid value for `{name}`"):
        parse_settings({name: value})


def test_yaml_scientific_notation_strings_are_numbers():
    assert parse_settings({"lr": "1e-3"}).lr == 1e-3


def test_yaml_on_and_off_are_packing_modes():
    """YAML 1.1 reads a bare `packing: off` as false; it means what it says."""
    assert parse_settings(yaml.safe_load("packing: off")).packing == "off"
    assert parse_settings(yaml.safe_load("packing: on")).packing == "on"
    assert parse_settings({}).packing == "auto"
    # mergekit validates each parameter against its declared type before the plugin reads it
    from mergekit_dam.plugin.method import _spec

    specs = {spec.name: spec for spec in _spec().parameters}
    for name, value in (("packing", False), ("packing", True), ("recompute", False)):
        assert specs[name].validate(value) is value
        assert parse_settings({name: value}).model_dump()[name] in {"off", "on", "none"}


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

    root = os.path.join(os.path.dirname(__file__), "..", "example_configs")
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

    files = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "example_configs", "multi", "*.yml")))
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
    here = os.path.join(os.path.dirname(__file__), "..", "example_configs", "lab")
    for name, config in merge_configs(manifest, f"{root}/dam_coefficients.safetensors").items():
        with open(os.path.join(here, f"{name}.yml")) as handle:
            assert yaml.safe_load(handle) == config, name


@pytest.mark.parametrize("model", [DamSettings, ModelSettings])
def test_every_setting_is_documented_with_its_choices(model):
    for name, field in model.model_fields.items():
        assert field.description and field.description.strip(), f"{model.__name__}.{name} has no description"
        for choice in typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else ():
            assert f"`{choice}`" in field.description, f"{model.__name__}.{name}: choice `{choice}` not described"


def test_readme_settings_tables_are_generated_from_the_fields():
    """README.md's Configuration tables are `settings_table` output, one row per setting
    (regenerate: python -c "from mergekit_dam.core.settings_table import update_readme_tables; update_readme_tables('README.md')")."""
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "README.md")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    lines = text.split("\n")
    tables = ["\n".join(lines[first:stop]) for first, stop in readme_tables(text)]
    assert tables == [settings_table(ModelSettings), settings_table(DamSettings)]
    assert [settings_table(model) for model in README_TABLES] == tables
    for model, table in zip(README_TABLES, tables):
        names = [row.split("|")[1].strip().strip("`") for row in table.split("\n")[2:]]
        assert names == list(model.model_fields)


def test_settings_table_rows():
    table = settings_table(DamSettings).split("\n")
    assert table[:2] == ["| name | default | description |", "|---|---|---|"]
    assert "| `steps` | unset | optimizer steps" in "\n".join(table)
    assert "| `retrain` | `false` | " in "\n".join(table) and "| `lr` | `auto` | " in "\n".join(table)
    assert settings_table(ModelSettings).split("\n")[2].startswith('| `dataset` | `""` | ')
