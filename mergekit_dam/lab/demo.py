"""The demo: the lab's experts merged six ways through stock mergekit, then compared.

Builds (or reuses) the lab (builder.py), writes the six configs of `example_configs/lab/`
(dam, dam_retain, linear, task_arithmetic, ties, dare_ties) for this lab
directory, runs `mergekit-yaml` on each DAM config (DAM trains inside its merge; each in
its own process, so its time is DAM's) and the four others as one `mergekit-multi`
pipeline (one process: mergekit's start-up, about 6 s, once), checks the DAM
output against sum_i c_i * W_i recomputed from the checkpoints, scores base, experts and
merges on every skill's held-out data (compare.py) and prints the table, each merge's
retention of the experts' gains, and where the chart is.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import yaml

from mergekit_dam.lab.builder import build
from mergekit_dam.lab.skills import SKILLS

# The demo trains with the package defaults (lr, batch size and steps `auto`/unset;
# BENCHMARKS.md); only the seed is the lab's.
DAM_LAB_SETTINGS = {"seed": 0}


# The simple merges with the settings users commonly start from: each one's per-model
# `parameters`, whether it takes the base model, and its top-level `parameters` if any.
SIMPLE_MERGES = {
    "linear": {"merge_method": "linear", "parameters": {"weight": 1.0}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"weight": 0.5}, "base": True},
    "ties": {"merge_method": "ties", "parameters": {"density": 0.5, "weight": 1.0}, "base": True, "top": {"normalize": True}},
    "dare_ties": {"merge_method": "dare_ties", "parameters": {"density": 0.5, "weight": 0.5}, "base": True},
}


def simple_merge_config(spec: dict, base: str, experts: Sequence[str]) -> dict:
    """The mergekit config of one SIMPLE_MERGES-style `spec` over `experts` (float32)."""
    config = {"merge_method": spec["merge_method"], "dtype": "float32",
              "models": [{"model": m, "parameters": dict(spec["parameters"])} for m in experts]}
    if spec.get("base"):
        config["base_model"] = base
    if spec.get("top"):
        config["parameters"] = dict(spec["top"])
    return config


def retain_artifact_of(artifact: str) -> str:
    stem, extension = os.path.splitext(artifact)
    return f"{stem}_retain{extension}"


def merge_configs(manifest: dict, artifact: str, dam_settings: Optional[dict] = None) -> Dict[str, dict]:
    """The six merges of the lab's experts: dam, dam with the lab's general text as
    `retain_dataset`, and the simple methods with the settings users commonly start from
    (weights 1/N-like, density 0.5)."""
    base = manifest["base"]
    experts = [entry["expert"] for entry in manifest["skills"].values()]  # the lab's skills, or a subset of them
    calibration = [entry["calibration"] for entry in manifest["skills"].values()]
    settings = {**DAM_LAB_SETTINGS, **(dam_settings or {})}

    def dam(parameters: dict) -> dict:
        return {"merge_method": "dam", "base_model": base,
                "models": [{"model": m, "parameters": {"dataset": d}} for m, d in zip(experts, calibration)],
                "parameters": {**parameters, **settings}, "dtype": "float32"}

    return {
        "dam": dam({"coefficients": artifact}),
        "dam_retain": dam({"coefficients": retain_artifact_of(artifact), "retain_dataset": manifest["general_calibration"]}),
        **{name: simple_merge_config(spec, base, experts) for name, spec in SIMPLE_MERGES.items()},
    }


def _tensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: Dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        tensors.update(load_file(file))
    return tensors


def mergekit_yaml(config: dict, config_path: str, out: str, quiet: bool, options: Sequence[str] = ()) -> float:
    """Seconds a stock `mergekit-yaml` run of `config` took; `options`: more of its flags (e.g. --cuda)."""
    with open(config_path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    return _run([os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"), config_path, out], quiet, options)


def mergekit_multi(configs: Dict[str, dict], config_path: str, folder: str, quiet: bool) -> float:
    """Seconds one stock `mergekit-multi` run (mergekit's multi-stage pipeline: several merges in
    one process) took to write each config's merge to `folder`/merged-NAME."""
    # a stage's name must differ from every method's: mergekit-multi reads any string equal to a
    # stage's name as a reference to that stage's output (`merge_method: ties` included)
    with open(config_path, "w", encoding="utf-8") as handle:
        yaml.safe_dump_all([{"name": f"merged-{name}", **config} for name, config in configs.items()], handle, sort_keys=False)
    return _run([os.path.join(os.path.dirname(sys.executable), "mergekit-multi"), config_path, "-I", folder, "--no-lazy"], quiet)


def _run(command: List[str], quiet: bool, options: Sequence[str] = ()) -> float:
    command = [*command, "--random-seed", "0", *options, *(["--quiet"] if quiet else [])]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL if quiet else None)
    return time.perf_counter() - start


def check_dam_output(merged_dir: str, artifact: str) -> float:
    """max |merged - sum_r c_r * W_r| over all tensors, from the raw files; the rows r are
    the models the artifact lists (the experts, and the base with task vectors)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(artifact, "pt") as handle:
        rows = json.loads(handle.metadata()["models"])
    merged, inputs = _tensors(merged_dir), [_tensors(m) for m in rows]
    return max(
        (merged[name].double() - sum(w[name].double() * c.double() for w, c in zip(inputs, table))).abs().max().item()
        for name, table in load_file(artifact).items()
    )


def run_demo(workdir: str, quiet: bool = False, recipe=None, dam_settings: Optional[dict] = None) -> Dict[str, object]:
    """`dam_settings`: DAM settings over the package defaults (tests make the run short)."""
    from mergekit_dam.tools.compare import Suite, score, write_outputs

    os.makedirs(workdir, exist_ok=True)
    manifest = build(os.path.join(workdir, "lab"), **({"recipe": recipe} if recipe else {}), progress=not quiet)
    artifact = os.path.join(workdir, "dam_coefficients.safetensors")
    configs = merge_configs(manifest, artifact, dam_settings)
    seconds = {name: mergekit_yaml(configs.pop(name), os.path.join(workdir, f"{name}.yml"), os.path.join(workdir, f"merged-{name}"), quiet)
               for name in ("dam", "dam_retain")}  # each in its own process: its time is DAM's cost
    seconds["simple merges"] = mergekit_multi(configs, os.path.join(workdir, "simple_merges.yml"), workdir, quiet)
    merges = ["dam", "dam_retain", *configs]
    worst = max(check_dam_output(os.path.join(workdir, "merged-dam"), artifact),
                check_dam_output(os.path.join(workdir, "merged-dam_retain"), retain_artifact_of(artifact)))

    models = {"base": manifest["base"], **{f"expert:{s}": manifest["skills"][s]["expert"] for s in SKILLS},
              **{name: os.path.join(workdir, f"merged-{name}") for name in merges}}
    results = score(models, Suite.from_lab(manifest))
    outputs = write_outputs(results, os.path.join(workdir, "compare"), highlight=merges)

    print(f"\nDAM demo in {workdir}: lab of 4 experts ({', '.join(SKILLS)}) fine-tuned from one base")
    print(f"merges: dam {seconds['dam']:.1f} s and dam_retain {seconds['dam_retain']:.1f} s (mergekit-yaml, each in its own "
          f"process); {', '.join(configs)} {seconds['simple merges']:.1f} s together (one mergekit-multi run)")
    print(f"DAM apply check: max |merged - sum_i c_i*W_i| = {worst:.2e}\n")
    print("held-out exact-match accuracy per skill (and KL to the skill's expert):")
    print(f"{'model':18s}" + "".join(f"{s:>20s}" for s in SKILLS) + f"{'general NLL':>13s}")
    for name, entry in results.items():
        print(f"{name:18s}" + "".join(f"{entry[s]['accuracy']:>11.2f} ({entry[s]['kl']:5.2f})" for s in SKILLS)
              + f"{entry.get('general_nll', float('nan')):13.3f}")
    print("\nretention of each expert's accuracy gain over the base (1 = as good as the expert):")
    for name in merges:
        retention = results[name].get("retention", {})
        print(f"{name:18s}" + "".join(f"{retention.get(s, {}).get('accuracy', float('nan')):>20.2f}" for s in SKILLS))
    print(f"\ntable: {outputs['table']}\nchart: {outputs['chart']}\nJSON:  {outputs['json']}")
    print(f"inspect the learned coefficients: mergekit-dam inspect {artifact}")
    if worst > 1e-5:
        raise SystemExit("demo check failed: the DAM output does not match its coefficients")
    return {"max_error": worst, "merges": merges, "seconds": seconds, "results": results, "outputs": outputs}
