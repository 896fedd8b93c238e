"""DAM variants side by side on the lab (held-out split), with linear as the floor.

    python benchmarks/lab_variants.py --lab dam-lab --out /tmp/dam-variants \\
        --variant end_to_end:mode=end_to_end --variant layerwise:mode=layerwise
    python benchmarks/lab_variants.py --lab dam-lab --out /tmp/dam-param \\
        --variant weights:parametrization=weights --variant task_vectors:parametrization=task_vectors

A variant is NAME:key=value[,key=value...]: DAM settings (values read as YAML) over the
demo's (demo.DAM_LAB_SETTINGS), or over the package defaults when its first item is the
word `defaults` (NAME:defaults,key=value...). Each merge
runs in its own `mergekit-yaml` process, so the training report's peak RSS is that
variant's own. Prints per-skill exact match, KL to the skill's expert and NLL retention,
training time and peak memory, and what distinguishes the experts in the coefficients
(`inspect`: spread across experts, correlation of their rows, dominance); writes variants.json.
`--calibration held-out` or `fresh:N` trains on other data than the lab's calibration sets, to
tell what limits a merge: the fit of the scored prompts, or the amount of data.
"""

import argparse
import json
import os

import torch
import yaml
from helpers import read_report, variant

from mergekit_dam.lab import SKILLS, Recipe, build, sample, skill_generators
from mergekit_dam.lab.demo import mergekit_yaml, merge_configs
from mergekit_dam.tools.compare import Suite, read_records, score
from mergekit_dam.tools.inspect_artifact import summarize

HELD_OUT_COPIES = 5  # so that every scored prompt is in DAM's training split (it holds out 20% for validation)


def calibration_sets(manifest: dict, source: str, folder: str) -> dict:
    """The manifest with each skill's DAM data replaced, for the diagnostics of what limits a merge:
    `lab`: the lab's own calibration files (unchanged); `held-out`: the scored prompts themselves,
    with their answers, as plain text like the lab's (an upper bound: how well coefficients can fit
    the very prompts that are scored); `fresh:N`: N new draws of each skill from the lab's own
    generators, fine-tuning split only (so never a scored prompt): what more data buys."""
    if source == "lab":
        return manifest
    kind, _, count = source.partition(":")
    if kind not in ("held-out", "fresh") or (kind == "fresh") != count.isdigit():
        raise ValueError(f"--calibration {source}: use lab, held-out or fresh:N")
    generators = skill_generators(Recipe().seed)
    skills = {}
    for index, (skill, entry) in enumerate(manifest["skills"].items()):
        if kind == "held-out":
            pairs = [(r["prompt"], r["answer"]) for r in read_records(entry["held_out"])] * HELD_OUT_COPIES
        else:
            pairs = sample(generators[skill], "train", int(count), torch.Generator().manual_seed(777 + index))
        path = os.path.join(folder, f"{skill}.{kind}.jsonl")
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps({"text": prompt + answer}) + "\n" for prompt, answer in pairs)
        skills[skill] = {**entry, "calibration": path}
    return {**manifest, "skills": skills}


def distinctness(artifact: str) -> dict:
    """Mean over tensors of the spread and row correlation, and each row's mean dominance."""
    summary = summarize(artifact)
    stats = list(summary["distinction"].values())
    correlations = [s["correlation"] for s in stats if s["correlation"] is not None]
    return {"spread": sum(s["spread"] for s in stats) / len(stats),
            "correlation": sum(correlations) / len(correlations) if correlations else None,
            "dominance": {os.path.basename(m): sum(s["dominance"][i] for s in stats) / len(stats) for i, m in enumerate(summary["models"])}}


def _figure(value) -> str:
    """A statistic for the summary line; None where it is undefined (one coefficient per tensor: no row correlation)."""
    return "n/a" if value is None else f"{value:.3f}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lab", default="dam-lab")
    parser.add_argument("--out", default="/tmp/dam-variants")
    parser.add_argument("--variant", type=variant, action="append", required=True)
    parser.add_argument("--skills", type=lambda text: text.split(","), default=list(SKILLS),
                        help="merge and score only these experts (comma-separated), e.g. shift,translate")
    parser.add_argument("--calibration", default="lab", help=(
        "DAM's data: `lab` (the lab's calibration sets), `held-out` (the scored prompts themselves: an upper "
        "bound) or `fresh:N` (N new draws per skill from the lab's generators, never a scored prompt)"))
    args = parser.parse_args()
    if unknown := set(args.skills) - set(SKILLS):
        parser.error(f"--skills: unknown {', '.join(sorted(unknown))}; the lab's skills are {', '.join(SKILLS)}")
    os.makedirs(args.out, exist_ok=True)
    manifest = build(os.path.abspath(args.lab))  # absolute: mergekit takes a relative name for a hub id
    manifest = {**manifest, "skills": {s: e for s, e in manifest["skills"].items() if s in args.skills}}
    try:
        manifest = calibration_sets(manifest, args.calibration, args.out)
    except ValueError as error:
        parser.error(str(error))
    skills = list(manifest["skills"])
    models, reports, coefficients = {}, {}, {}
    for name, settings in args.variant:
        artifact = os.path.join(args.out, f"{name}.safetensors")
        config = merge_configs(manifest, artifact)["dam"]
        settings = dict(settings)
        start = {"coefficients": artifact} if settings.pop("defaults", False) else config["parameters"]
        config["parameters"] = {**start, **settings, "retrain": True}
        models[f"dam:{name}"] = os.path.join(args.out, f"merged-{name}")
        mergekit_yaml(config, os.path.join(args.out, f"{name}.yml"), models[f"dam:{name}"], quiet=True)
        reports[name] = read_report(artifact)
        coefficients[name] = distinctness(artifact)
    models["linear"] = os.path.join(args.out, "merged-linear")
    mergekit_yaml(merge_configs(manifest, "")["linear"], os.path.join(args.out, "linear.yml"), models["linear"], quiet=True)
    experts = {f"expert:{s}": manifest["skills"][s]["expert"] for s in skills}  # for retention
    results = score({"base": manifest["base"], **experts, **models}, Suite.from_lab(manifest))
    print(f"{'merge':20s}" + "".join(f"{s:>26s}" for s in skills) + f"{'general NLL':>13s}")
    for name in models:
        entry = results[name]
        print(f"{name:20s}" + "".join(
            f"{entry[s]['accuracy']:>8.2f} KL {entry[s]['kl']:5.2f} ret {entry['retention'][s]['nll']:5.2f}"
            for s in skills) + f"{entry.get('general_nll', float('nan')):>13.2f}")
    for name, report in reports.items():
        print(f"{name:14s} training {report['seconds']:.1f} s, peak RSS {report['peak_memory_bytes'] / 2**30:.2f} GiB, "
              f"held-out KL (calibration tail) {sum(report['held_out_kl']['final'].values()) / len(skills):.3f} "
              f"(linear {sum(report['held_out_kl']['step_0_linear_average'].values()) / len(skills):.3f}); coefficients: "
              f"spread {coefficients[name]['spread']:.3f}, row correlation {_figure(coefficients[name]['correlation'])}, dominance "
              + ", ".join(f"{m} {share:.2f}" for m, share in coefficients[name]["dominance"].items()))
    with open(os.path.join(args.out, "variants.json"), "w") as handle:
        json.dump({"variants": dict(args.variant), "skills": skills, "calibration": args.calibration,
                   "results": results, "coefficients": coefficients,
                   "reports": {m: {k: r.get(k) for k in ("seconds", "peak_memory_bytes", "held_out_kl", "training_kl")}
                               for m, r in reports.items()}}, handle, indent=1)


if __name__ == "__main__":
    main()
