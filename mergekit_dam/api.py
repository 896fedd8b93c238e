"""Python API for pipelines: run DAM's pre-merge stage (train, or check an artifact)
without merging, exactly as `mergekit-yaml` runs it before a merge."""

from __future__ import annotations

from typing import Optional, Union

import yaml

from mergekit_dam.core.errors import DamError


def load_config(config: Union[str, dict, object]):
    from mergekit.config import MergeConfiguration

    if isinstance(config, MergeConfiguration):
        return config.model_copy(deep=True)  # planning normalises it in place
    from pydantic import ValidationError

    source = "the config"
    if isinstance(config, str):
        source = config
        try:
            with open(config, "r", encoding="utf-8") as handle:
                config = yaml.safe_load(handle)
        except FileNotFoundError:
            raise DamError(f"dam: config file {source} does not exist; check the path") from None
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise DamError(f"dam: {source} is not a readable YAML file ({str(error).splitlines()[0]}); fix it") from None
    try:
        return MergeConfiguration.model_validate(config)
    except (ValidationError, RuntimeError) as error:
        first = error.errors()[0] if isinstance(error, ValidationError) else {"loc": (), "msg": str(error)}
        where = ".".join(str(part) for part in first["loc"])
        raise DamError(f"dam: {source} is not a valid mergekit config ({where + ': ' if where else ''}{first['msg']}); fix it") from None


def train(config, options=None, out: Optional[str] = None):
    """Learn (or reuse) the coefficients of a `merge_method: dam` config; returns the
    CoefficientSource (its `artifact_path` is None for an equal-weight merge).

    `config`: a MergeConfiguration, a dict, or a YAML path. `out` overrides the
    `coefficients` parameter. `options`: mergekit MergeOptions (trust_remote_code,
    quiet, caches); mergekit's math-device options do not affect training.
    """
    from mergekit.merge import MergeOptions

    from mergekit_dam.plugin import host, preflight
    from mergekit_dam.plugin.prepared import PREPARED
    from mergekit_dam.plugin.registration import register

    register()

    config = load_config(config)
    if config.merge_method != "dam":
        raise DamError(f"dam: the config's merge_method is `{config.merge_method}`, not `dam`")
    if out is not None:
        config.parameters = {**(config.parameters or {}), "coefficients": out}
    preflight.check_datasets(config)  # as mergekit-yaml does for a dam merge, before mergekit reads a model
    preflight.check_models(config)
    planner = host.plan_merge(config, options or MergeOptions())  # DAM's validate_inputs runs the stage here, as in a merge
    return PREPARED.of(planner)
