"""Shared fixtures: tiny model families built once per session, and independent helpers
that read checkpoints and artifacts with plain safetensors (never the code under test)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from typing import Dict, List, Sequence

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_dam.lab import SKILLS, Recipe, build
from mergekit_dam.lab.tiny import make_family

BIN = os.path.dirname(sys.executable)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def read_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (one file or shards)."""
    tensors: Dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        tensors.update(load_file(file))
    return tensors


def expected_merge(models: Sequence[str], coefficients: Dict[str, torch.Tensor], rows: Sequence[str]) -> Dict[str, torch.Tensor]:
    """sum_i c[row(i)] * W_i recomputed from the input checkpoints, in float64."""
    weights = {model: read_checkpoint(model) for model in models}
    result = {}
    for name, table in coefficients.items():
        total = 0
        for model in models:
            c = table[rows.index(model)].double()
            w = weights[model][name].double()
            total = total + (w * c if w.ndim else w * c[0])
        result[name] = total
    return result


def artifact_rows(path) -> List[str]:
    """The artifact's rows (input models, as the config wrote them), from its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return json.loads(handle.metadata()["models"])


def artifact_merge(path) -> Dict[str, torch.Tensor]:
    """sum over the artifact's own rows of c_row * W_row, recomputed from the checkpoints
    the rows name: the merge mergekit should have written, whatever the parametrization."""
    rows = artifact_rows(path)
    return expected_merge(rows, load_file(str(path)), rows)


def linear_start(path, base: str) -> torch.Tensor:
    """[rows, 1]: the linear average of the experts in the artifact's row layout: 1/N
    each, or with task vectors (a base row) 1/N per expert and 0 for the base."""
    rows = artifact_rows(path)
    experts = [row for row in rows if row != base]
    return torch.tensor([[0.0] if row == base else [1.0 / len(experts)] for row in rows])


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> Dict[str, List[str]]:
    """[base, expert_1, expert_2, expert_3] per architecture; qwen2 has tied embeddings
    and q/k/v biases; all use grouped-query attention."""
    root = tmp_path_factory.mktemp("families")
    return {arch: make_family(str(root / arch), arch, seed=index) for index, arch in enumerate(("llama", "mistral", "qwen2"))}


def write_config(path, config: dict) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    return str(path)


def mergekit_yaml(config_path: str, out: str, *options: str, check: bool = True) -> subprocess.CompletedProcess:
    """The stock CLI in a fresh process: proves registration through the .pth hook."""
    result = subprocess.run(
        [os.path.join(BIN, "mergekit-yaml"), config_path, out, *options],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mergekit-yaml failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def dam_config(models: Sequence[str], base: str | None = None, parameters: dict | None = None, **extra) -> dict:
    config = {"merge_method": "dam", "models": [{"model": m} for m in models], "dtype": "float32"}
    if base:
        config["base_model"] = base
    if parameters:
        config["parameters"] = parameters
    config.update(extra)
    return config


# A reduced lab recipe: four experts that really differ, built in seconds.
SMALL_LAB = Recipe(hidden=32, layers=2, pretrain_steps=30, finetune_steps=60, batch=16, calibration=48, validation=16, held_out=16)


def small_lab(root, **changes) -> dict:
    manifest = build(str(root), Recipe(**{**SMALL_LAB.__dict__, **changes}), progress=False)
    return {"base": manifest["base"], "experts": [manifest["skills"][s]["expert"] for s in SKILLS],
            "data": [manifest["skills"][s]["calibration"] for s in SKILLS],
            "general": manifest["general_calibration"], "general_held_out": manifest["general"]}


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    return small_lab(tmp_path_factory.mktemp("lab"))


def lab_dam_config(lab, artifact, data=True, **parameters) -> dict:
    """A dam config over a small lab: every expert with its calibration data (or none)."""
    models = [{"model": m, **({"parameters": {"dataset": d}} if data else {})} for m, d in zip(lab["experts"], lab["data"])]
    return {"merge_method": "dam", "base_model": lab["base"], "models": models, "dtype": "float32",
            "parameters": {"coefficients": str(artifact), **parameters}}


# --- the training runs' helpers (tests/integration/) ----------------------------------------

FAST = {"steps": 12, "lr": 0.02, "max_length": 24, "batch_size": 4, "samples": 40, "schedule": "constant"}  # the rate these tests were sized for
N = len(SKILLS)


def lab_config(lab, artifact, data=True, **parameters):
    return lab_dam_config(lab, artifact, data, **{**FAST, **parameters})


def merge(config, out, **options):
    """mergekit's run_merge of `config` (a dict) into `out`, quietly."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True, **options))


def update_agreement(a, b):
    """How closely two runs moved the coefficients away from 1/N: the relative error of
    b's updates against a's, and their cosine, over all tables together."""
    da = torch.cat([(a[n] - 1 / N).flatten() for n in sorted(a)]).double()
    db = torch.cat([(b[n] - 1 / N).flatten() for n in sorted(a)]).double()
    return float((db - da).norm() / da.norm()), float(torch.nn.functional.cosine_similarity(da, db, dim=0))


BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def benchmark_script(name: str):
    """benchmarks/<name>.py as a module, importing its helpers module from beside it (as when
    run as a script)."""
    import importlib.util

    sys.path.insert(0, BENCHMARKS)
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", os.path.join(BENCHMARKS, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # a dataclass looks its module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(BENCHMARKS)
