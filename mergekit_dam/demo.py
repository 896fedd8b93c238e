"""The demo: tiny generated models merged with `dam` and `linear` through stock mergekit-yaml.

Builds a base model and three experts (tiny Llama geometry, offline), writes a
coefficient artifact, runs `mergekit-yaml` for a DAM merge and a linear merge of the
same experts, and checks every DAM output tensor against sum_i c_i * W_i recomputed
from the input checkpoints.
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import sys
import time
from typing import Dict, List

import torch
import yaml

from mergekit_dam.artifact import write_artifact
from mergekit_dam.tiny import make_family

LOG = logging.getLogger("mergekit_dam")


def _tensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: Dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        tensors.update(load_file(file))
    return tensors


def demo_coefficients(experts: List[str], seed: int = 0) -> Dict[str, torch.Tensor]:
    """Per-column coefficients around 1/N, each expert favoured on different columns:
    the kind of artifact the training stage produces."""
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for name, tensor in _tensors(experts[0]).items():
        width = tensor.shape[-1] if tensor.ndim else 1
        logits = torch.randn(len(experts), width, generator=generator)
        result[name] = torch.softmax(logits, dim=0)  # columns sum to 1
    return result


def _mergekit_yaml(config: dict, config_path: str, out: str, quiet: bool) -> float:
    with open(config_path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    command = [os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"), config_path, out]
    if quiet:
        command.append("--quiet")
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL if quiet else None)
    return time.perf_counter() - start


def run_demo(workdir: str, quiet: bool = False) -> Dict[str, float]:
    os.makedirs(workdir, exist_ok=True)
    models_dir = os.path.join(workdir, "models")
    if not os.path.exists(os.path.join(models_dir, "expert_3", "config.json")):
        LOG.info("building a tiny base model and three experts in %s", models_dir)
        make_family(models_dir, "llama", hidden=64, layers=4)
    base = os.path.join(models_dir, "base")
    experts = [os.path.join(models_dir, f"expert_{i}") for i in (1, 2, 3)]

    artifact = os.path.join(workdir, "dam_coefficients.safetensors")
    coefficients = demo_coefficients(experts)
    write_artifact(artifact, coefficients, experts, {"source": "demo (generated, not trained)"})

    models = [{"model": m} for m in experts]
    dam = {"merge_method": "dam", "base_model": base, "models": models, "dtype": "float32",
           "parameters": {"coefficients": artifact}}
    linear = {"merge_method": "linear",  # linear has no use for a base model
              "models": [{**m, "parameters": {"weight": 1.0}} for m in models], "dtype": "float32"}
    seconds = {
        "dam": _mergekit_yaml(dam, os.path.join(workdir, "dam.yml"), os.path.join(workdir, "merged-dam"), quiet),
        "linear": _mergekit_yaml(linear, os.path.join(workdir, "linear.yml"), os.path.join(workdir, "merged-linear"), quiet),
    }

    merged = _tensors(os.path.join(workdir, "merged-dam"))
    inputs = [_tensors(m) for m in experts]
    worst = 0.0
    for name, table in coefficients.items():
        expected = sum(w[name].double() * c.double() for w, c in zip(inputs, table))
        worst = max(worst, (merged[name].double() - expected).abs().max().item())
    linear_out = _tensors(os.path.join(workdir, "merged-linear"))
    differs = sum((merged[n] - linear_out[n]).abs().max().item() > 0 for n in merged)

    print(f"\nDAM demo in {workdir}")
    print(f"  inputs      : base + 3 experts (tiny Llama, {len(merged)} tensors)")
    print(f"  artifact    : {artifact}")
    print(f"  dam merge   : {os.path.join(workdir, 'merged-dam')}  ({seconds['dam']:.1f} s via mergekit-yaml)")
    print(f"  linear merge: {os.path.join(workdir, 'merged-linear')}  ({seconds['linear']:.1f} s via mergekit-yaml)")
    print(f"  check       : max |dam - sum_i c_i*W_i| = {worst:.2e} over all tensors; {differs}/{len(merged)} tensors differ from linear")
    if worst > 1e-5:
        raise SystemExit("demo check failed: the DAM output does not match the coefficients")
    return {"max_error": worst, **seconds}
