"""Every use of mergekit internals (names it does not export as API, and the planner's
structure) goes through here, so that a mergekit upgrade touches one file.

mergekit 0.1.5 gives a merge method no planning hook: its MergePlanner calls
`method.validate_inputs` once per output slice right after normalising the config.
`calling_planner` finds that planner on the stack, and `merge_context` turns it into a
`MergeContext`, an immutable view of what the plugin reads from a merge: the rest of
the plugin never sees the planner or mergekit's options object.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional


@dataclass(frozen=True)
class MergeContext:
    """What DAM's pre-merge stage reads from one mergekit merge."""

    config: Any  # the MergeConfiguration after normalize_config (modules -> slices -> sources); a copy
    arch_info: Any  # mergekit's ModelArchitecture of the inputs (read through this module only)
    out_config: Any  # the transformers config of the output model
    quiet: bool = False
    trust_remote_code: bool = False
    lazy_unpickle: bool = False
    transformers_cache: Optional[str] = None
    lora_merge_cache: Optional[str] = None


def tensor_loader(model):
    """mergekit's cached lazy tensor loader for a ModelReference (`.get_tensor`, `.index`)."""
    from mergekit.io.tasks import LoaderCache

    return LoaderCache().get(model)


# --- the planner -----------------------------------------------------------------


def calling_planner(depth: int = 1) -> Optional[Any]:
    """The mergekit MergePlanner whose method is `depth` frames above the caller of this
    function (1: the planner called the function that asks), or None (e.g. a call from
    `merge_state_dicts`)."""
    try:
        frame = sys._getframe(depth + 1)
    except ValueError:  # the stack is not that deep
        return None
    caller = frame.f_locals.get("self")
    plan = sys.modules.get("mergekit.plan")
    if plan is not None and isinstance(caller, plan.MergePlanner):
        return caller
    return None


def merge_context(planner) -> MergeContext:
    """The immutable context of a planner whose config has been normalised."""
    options = planner.options
    return MergeContext(
        config=planner.config.model_copy(deep=True),
        arch_info=planner.arch_info,
        out_config=planner.out_model_config,
        quiet=options.quiet,
        trust_remote_code=options.trust_remote_code,
        lazy_unpickle=options.lazy_unpickle,
        transformers_cache=options.transformers_cache,
        lora_merge_cache=options.lora_merge_cache,
    )


def plan_merge(config, options):
    """Plan `config` as mergekit-yaml does up to normalising it (which runs a `dam`
    merge's pre-merge stage), without planning or running any tensor task.
    `config` is normalised in place; returns the planner."""
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.plan import MergePlanner

    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    with _quiet_transformers():  # mergekit sets config.torch_dtype, which transformers 5 calls deprecated
        out_config = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    planner.normalize_config()
    return planner


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as transformers_logging

    before = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(before)


# --- architecture ------------------------------------------------------------------


def output_weights(context: MergeContext) -> Iterator[Any]:
    """Every weight (mergekit WeightInfo: name, aliases, tied_names, optional) of the
    output model, module by module, as mergekit's planner enumerates them."""
    from mergekit.architecture import ConfiguredModuleArchitecture

    for module_def in context.arch_info.modules.values():
        out_arch = ConfiguredModuleArchitecture(
            info=module_def.architecture, config=context.out_config, weight_prefix=module_def.weight_prefix
        )
        yield from out_arch.all_weights()


def num_layers(context: MergeContext, module_name: str, model) -> int:
    """How many layers `model` has in output module `module_name`."""
    module_arch = context.arch_info.modules[module_name].architecture
    return module_arch.num_layers(model.config(trust_remote_code=context.trust_remote_code))


# --- tokenizer -----------------------------------------------------------------------


def set_chat_template(tokenizer, config) -> None:
    """Apply the config's `chat_template` to `tokenizer` exactly as mergekit does for
    the merged model's tokenizer."""
    from mergekit.merge import _set_chat_template

    _set_chat_template(tokenizer, config)


__all__ = [
    "MergeContext",
    "calling_planner",
    "merge_context",
    "num_layers",
    "output_weights",
    "plan_merge",
    "set_chat_template",
    "tensor_loader",
]
