"""The demo: a tiny lab merged with `dam` (trained) and `linear` through stock mergekit-yaml.

Builds a base model and three experts fine-tuned from it on different synthetic skills
(offline, cached in the work directory), runs `mergekit-yaml` on a DAM config whose
experts carry calibration datasets (the training stage learns the coefficients inside
the merge) and on a linear config of the same experts, checks every DAM output tensor
against sum_i c_i * W_i recomputed from the checkpoints and the artifact, and prints
the held-out KL to each expert for both merges.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import subprocess
import sys
import time
from typing import Dict

import torch
import yaml

from mergekit_dam.tiny import SKILLS, make_lab

LOG = logging.getLogger("mergekit_dam")
LAB_RECIPE = {"hidden": 64, "layers": 2, "steps": 150, "examples": 120, "seed": 0}


def _tensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: Dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        tensors.update(load_file(file))
    return tensors


def _mergekit_yaml(config: dict, config_path: str, out: str, quiet: bool) -> float:
    with open(config_path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    command = [os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"), config_path, out]
    if quiet:
        command.append("--quiet")
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL if quiet else None)
    return time.perf_counter() - start


def held_out_kl(model_dir: str, experts, data_files, temperature: float = 2.0) -> Dict[str, float]:
    """KL(expert || model) on each expert's held-out examples (not used for training)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_dam.data import collate
    from mergekit_dam.objective import kl_divergence

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    result = {}
    for skill, expert_dir, data in zip(SKILLS, experts, data_files):
        expert = AutoModelForCausalLM.from_pretrained(expert_dir, dtype=torch.float32).eval()
        with open(data, encoding="utf-8") as handle:
            texts = [json.loads(line)["text"] for line in handle]
        ids, mask = collate([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)
        with torch.no_grad():
            result[skill] = kl_divergence(model(input_ids=ids, attention_mask=mask).logits,
                                          expert(input_ids=ids, attention_mask=mask).logits, mask, temperature).item()
    return result


def run_demo(workdir: str, quiet: bool = False) -> Dict[str, object]:
    os.makedirs(workdir, exist_ok=True)
    lab_dir = os.path.join(workdir, "lab")
    marker = os.path.join(lab_dir, "lab.json")
    lab = None
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as handle:
            lab = json.load(handle)
        if lab.get("recipe") != LAB_RECIPE:
            lab = None  # built by another recipe: rebuild
    if lab is None:
        LOG.info("building the tiny lab (base + 3 experts fine-tuned on different skills) in %s", lab_dir)
        lab = {"recipe": LAB_RECIPE, **make_lab(lab_dir, **LAB_RECIPE)}
        with open(marker, "w", encoding="utf-8") as handle:
            json.dump(lab, handle)

    artifact = os.path.join(workdir, "dam_coefficients.safetensors")
    dam = {
        "merge_method": "dam",
        "base_model": lab["base"],
        "models": [{"model": m, "parameters": {"dataset": d}} for m, d in zip(lab["experts"], lab["data"])],
        "parameters": {"coefficients": artifact, "steps": 60, "lr": 0.01, "max_length": 32, "batch_size": 8,
                       "samples": 100, "seed": 0},
        "dtype": "float32",
    }
    linear = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in lab["experts"]],
              "dtype": "float32"}
    seconds = {
        "dam (train + merge)": _mergekit_yaml(dam, os.path.join(workdir, "dam.yml"), os.path.join(workdir, "merged-dam"), quiet),
        "linear": _mergekit_yaml(linear, os.path.join(workdir, "linear.yml"), os.path.join(workdir, "merged-linear"), quiet),
    }

    # independent check of the apply stage: sum_i c_i * W_i from the raw files
    from safetensors.torch import load_file

    coefficients = load_file(artifact)
    merged = _tensors(os.path.join(workdir, "merged-dam"))
    inputs = [_tensors(m) for m in lab["experts"]]
    worst = max(
        (merged[name].double() - sum(w[name].double() * c.double() for w, c in zip(inputs, table))).abs().max().item()
        for name, table in coefficients.items()
    )
    kl = {
        "dam": held_out_kl(os.path.join(workdir, "merged-dam"), lab["experts"], lab["held_out"]),
        "linear": held_out_kl(os.path.join(workdir, "merged-linear"), lab["experts"], lab["held_out"]),
    }
    print(f"\nDAM demo in {workdir}")
    print(f"  lab         : {lab['base']} + experts {', '.join(SKILLS)}")
    print(f"  artifact    : {artifact}  (training report: {os.path.splitext(artifact)[0]}.report.json)")
    for name, value in seconds.items():
        print(f"  {name:19s}: {value:.1f} s via mergekit-yaml")
    print(f"  check       : max |dam - sum_i c_i*W_i| = {worst:.2e} over {len(coefficients)} tensors")
    print("\n  KL(expert || merge), T=2, held-out examples (lower = closer to the expert)")
    print(f"  {'skill':12s} {'linear':>8s} {'dam':>8s}")
    for skill in SKILLS:
        print(f"  {skill:12s} {kl['linear'][skill]:8.4f} {kl['dam'][skill]:8.4f}")
    if worst > 1e-5:
        raise SystemExit("demo check failed: the DAM output does not match its coefficients")
    return {"max_error": worst, "seconds": seconds, "kl": kl}
