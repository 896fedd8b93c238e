"""The settings' validation and defaults (core/settings.py)."""

import typing

import pytest
import yaml

from mergekit_dam.core.errors import DamError
from mergekit_dam.core.settings import DamSettings, ModelSettings, parse_settings


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


@pytest.mark.parametrize("model", [DamSettings, ModelSettings])
def test_every_setting_is_documented_with_its_choices(model):
    for name, field in model.model_fields.items():
        assert field.description and field.description.strip(), f"{model.__name__}.{name} has no description"
        for choice in typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else ():
            assert f"`{choice}`" in field.description, f"{model.__name__}.{name}: choice `{choice}` not described"
