"""host.py is the one module that touches mergekit internals; the rest of the plugin sees
a frozen MergeContext, never the planner."""

import ast
import dataclasses
import os
from types import SimpleNamespace

import pytest
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions

from mergekit_dam.plugin import host

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "..", "mergekit_dam")
INTERNAL_NAMES = {"LoaderCache", "MergePlanner", "_getframe"}


def test_only_host_uses_mergekit_internals():
    offenders = []
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(root, name)
            if not name.endswith(".py") or os.path.samefile(path, host.__file__):
                continue
            with open(path, encoding="utf-8") as handle:
                tree = ast.parse(handle.read())
            for node in ast.walk(tree):
                where = f"{os.path.relpath(path, PACKAGE)}:{getattr(node, 'lineno', '?')}"
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mergekit":
                    offenders += [f"{where} imports {node.module}.{a.name}" for a in node.names
                                  if a.name.startswith("_") or a.name in INTERNAL_NAMES]
                    if node.module in ("mergekit.plan", "mergekit.io.tasks"):
                        offenders.append(f"{where} imports from {node.module}")
                elif isinstance(node, ast.Attribute) and node.attr in INTERNAL_NAMES:
                    offenders.append(f"{where} uses .{node.attr}")
    assert offenders == []


def test_no_planner_outside_a_merge():
    assert host.calling_planner() is None
    assert host.calling_planner(depth=10_000) is None


def test_merge_context_is_a_frozen_copy():
    config = MergeConfiguration.model_validate({"merge_method": "dam", "models": [{"model": "a"}], "chat_template": "chatml"})
    options = MergeOptions(quiet=True, trust_remote_code=True, lazy_unpickle=True, transformers_cache="tc", lora_merge_cache="lc")
    planner = SimpleNamespace(config=config, arch_info="arch", out_model_config="out", options=options)
    context = host.merge_context(planner)
    assert (context.quiet, context.trust_remote_code, context.lazy_unpickle) == (True, True, True)
    assert (context.transformers_cache, context.lora_merge_cache) == ("tc", "lc")
    assert (context.arch_info, context.out_config) == ("arch", "out")
    assert context.config == config and context.config is not config
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.quiet = False
