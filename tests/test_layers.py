"""The package's structure, read from its source (imports at any depth, function-level ones
included): the layers stand on each other, nothing imports in a circle, the apply path
never reaches the training engine, and no function or module outgrows what one reader holds."""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, "mergekit_dam")
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 60, 350

# each layer and the layers it may import (itself included); the top (api, cli, the package) any
LAYERS = {
    "mergekit_dam.core": {"mergekit_dam.core"},
    "mergekit_dam.training": {"mergekit_dam.core", "mergekit_dam.training"},
    "mergekit_dam.plugin": {"mergekit_dam.core", "mergekit_dam.training", "mergekit_dam.plugin"},
    "mergekit_dam.tools": {"mergekit_dam.core", "mergekit_dam.training", "mergekit_dam.plugin", "mergekit_dam.tools"},
    "mergekit_dam.lab": {"mergekit_dam.core", "mergekit_dam.training", "mergekit_dam.plugin", "mergekit_dam.tools",
                         "mergekit_dam.lab"},
}
# the plugin reaches the training engine at one place: the launch of a training job
PLUGIN_TO_TRAINING = {"mergekit_dam.plugin.launch"}


def _modules() -> Dict[str, str]:
    modules = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, os.path.join(ROOT, os.pardir))[:-3].split(os.sep)
                modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _trees() -> Dict[str, ast.Module]:
    trees = {}
    for module, path in MODULES.items():
        with open(path, encoding="utf-8") as handle:
            trees[module] = ast.parse(handle.read(), path)
    return trees


TREES = _trees()


def _imports(module: str) -> Set[str]:
    """The package's modules `module` imports anywhere in its body (`from a import b`: a.b
    when that is a module, else a)."""
    found = set()
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in MODULES and name != module}
    if module.startswith("mergekit_dam.") and "import_module" in ast.unparse(TREES[module]):
        for node in ast.walk(TREES[module]):  # import_module(f"package.{name}"): every module of that package
            if isinstance(node, ast.JoinedStr) and isinstance(node.values[0], ast.Constant):
                prefix = str(node.values[0].value)
                found |= {name for name in MODULES if name.startswith(prefix) and prefix.startswith("mergekit_dam.")}
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _layer(module: str):
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), None)


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for module, imported in GRAPH.items():
        layer = _layer(module)
        if layer is None:
            continue
        for target in imported:
            target_layer = _layer(target)
            if target_layer is None or target_layer not in LAYERS[layer]:
                wrong.append(f"{module} -> {target}")
            elif layer == "mergekit_dam.plugin" and target_layer == "mergekit_dam.training" and module not in PLUGIN_TO_TRAINING:
                wrong.append(f"{module} -> {target} (the plugin reaches training only through {sorted(PLUGIN_TO_TRAINING)})")
    assert not wrong, wrong


def _reachable(start: str) -> Set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in GRAPH[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_no_import_cycles():
    cycles = sorted(module for module in MODULES if module in _reachable(module))
    assert not cycles, f"modules that import themselves through others: {cycles}"


def test_the_apply_path_never_reaches_the_training_engine():
    reached = _reachable("mergekit_dam.plugin.method")
    assert not {module for module in reached if _layer(module) == "mergekit_dam.training"}


def _too_long() -> List[str]:
    found = []
    for module, tree in TREES.items():
        lines = len(open(MODULES[module], encoding="utf-8").read().splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{module}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                found.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    return found


def test_no_function_or_module_outgrows_one_reading():
    assert not _too_long()


def test_the_checker_sees_imports_inside_functions():
    """The graph is not empty by mistake: imports inside functions are edges too (cli.py
    imports each subcommand's module in its handler), and a layer rule would catch one."""
    assert {"mergekit_dam.lab.demo", "mergekit_dam.tools.compare", "mergekit_dam.api"} <= GRAPH["mergekit_dam.cli"]
    assert "mergekit_dam.plugin.launch" in GRAPH["mergekit_dam.plugin.decision"]


BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def test_benchmarks_use_public_names_and_one_helper_module():
    """Benchmarks time the package's own code through its public names: no private name of
    the package, no path tricks, and no other benchmark script but the shared helpers."""
    scripts = {name[:-3] for name in os.listdir(BENCHMARKS) if name.endswith(".py")}
    wrong = []
    for script in sorted(scripts):
        with open(os.path.join(BENCHMARKS, f"{script}.py"), encoding="utf-8") as handle:
            source = handle.read()
        if "sys.path" in source:
            wrong.append(f"{script}: sys.path")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [alias.name for alias in node.names]
                if node.module.startswith("mergekit_dam") and any(n.startswith("_") for n in names + node.module.split(".")):
                    wrong.append(f"{script}: from {node.module} import {names}")
                if node.module in scripts - {"helpers"}:
                    wrong.append(f"{script}: imports the script {node.module}")
            elif isinstance(node, ast.Import):
                wrong += [f"{script}: imports the script {a.name}" for a in node.names if a.name in scripts - {"helpers"}]
    assert not wrong, wrong
