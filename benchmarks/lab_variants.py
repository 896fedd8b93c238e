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
"""

import argparse
import json
import os

import yaml

from mergekit_dam.tools.compare import Suite, score
from mergekit_dam.tools.demo import _mergekit_yaml, merge_configs
from mergekit_dam.tools.inspect_artifact import summarize
from mergekit_dam.tools.lab import SKILLS, build


def variant(text: str) -> tuple:
    name, _, settings = text.partition(":")
    items = [item for item in settings.split(",") if item]
    over_defaults = bool(items) and items[0] == "defaults"
    values = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in items[over_defaults:])}
    return name, ({"defaults": True} if over_defaults else {}) | values


def distinctness(artifact: str) -> dict:
    """Mean over tensors of the spread and row correlation, and each row's mean dominance."""
    summary = summarize(artifact)
    stats = list(summary["distinction"].values())
    correlations = [s["correlation"] for s in stats if s["correlation"] is not None]
    return {"spread": sum(s["spread"] for s in stats) / len(stats),
            "correlation": sum(correlations) / len(correlations) if correlations else None,
            "dominance": {os.path.basename(m): sum(s["dominance"][i] for s in stats) / len(stats) for i, m in enumerate(summary["models"])}}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lab", default="dam-lab")
    parser.add_argument("--out", default="/tmp/dam-variants")
    parser.add_argument("--variant", type=variant, action="append", required=True)
    parser.add_argument("--skills", type=lambda text: text.split(","), default=list(SKILLS),
                        help="merge and score only these experts (comma-separated), e.g. shift,translate")
    args = parser.parse_args()
    if unknown := set(args.skills) - set(SKILLS):
        parser.error(f"--skills: unknown {', '.join(sorted(unknown))}; the lab's skills are {', '.join(SKILLS)}")
    os.makedirs(args.out, exist_ok=True)
    manifest = build(os.path.abspath(args.lab))  # absolute: mergekit takes a relative name for a hub id
    manifest = {**manifest, "skills": {s: e for s, e in manifest["skills"].items() if s in args.skills}}
    skills = list(manifest["skills"])
    models, reports, coefficients = {}, {}, {}
    for name, settings in args.variant:
        artifact = os.path.join(args.out, f"{name}.safetensors")
        config = merge_configs(manifest, artifact)["dam"]
        settings = dict(settings)
        start = {"coefficients": artifact} if settings.pop("defaults", False) else config["parameters"]
        config["parameters"] = {**start, **settings, "retrain": True}
        models[f"dam:{name}"] = os.path.join(args.out, f"merged-{name}")
        _mergekit_yaml(config, os.path.join(args.out, f"{name}.yml"), models[f"dam:{name}"], quiet=True)
        with open(os.path.join(args.out, f"{name}.report.json")) as handle:
            reports[name] = json.load(handle)
        coefficients[name] = distinctness(artifact)
    models["linear"] = os.path.join(args.out, "merged-linear")
    _mergekit_yaml(merge_configs(manifest, "")["linear"], os.path.join(args.out, "linear.yml"), models["linear"], quiet=True)
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
              f"spread {coefficients[name]['spread']:.3f}, row correlation {coefficients[name]['correlation']:.3f}, dominance "
              + ", ".join(f"{m} {share:.2f}" for m, share in coefficients[name]["dominance"].items()))
    with open(os.path.join(args.out, "variants.json"), "w") as handle:
        json.dump({"variants": dict(args.variant), "skills": skills, "results": results, "coefficients": coefficients,
                   "reports": {m: {k: r[k] for k in ("seconds", "peak_memory_bytes", "held_out_kl")} for m, r in reports.items()}}, handle, indent=1)


if __name__ == "__main__":
    main()
