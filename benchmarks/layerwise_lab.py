"""Layer-wise vs end-to-end DAM on the lab (held-out split), with linear as the floor.

    python benchmarks/layerwise_lab.py --lab dam-lab --out /tmp/dam-layerwise

Both modes use the demo's DAM settings (demo.DAM_LAB_SETTINGS, chosen for end-to-end
on the validation split; layer-wise gets the same `steps` per stage). Each merge runs in
its own `mergekit-yaml` process, so the training report's peak RSS is that mode's own.
Prints per-skill exact match, KL to the skill's expert and NLL retention, plus training
time and peak memory; writes layerwise_lab.json.
"""

import argparse
import json
import os

from mergekit_dam.tools.compare import Suite, score
from mergekit_dam.tools.demo import _mergekit_yaml, merge_configs
from mergekit_dam.tools.lab import SKILLS, build


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lab", default="dam-lab")
    parser.add_argument("--out", default="/tmp/dam-layerwise")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    manifest = build(args.lab)
    models, reports = {}, {}
    for mode in ("end_to_end", "layerwise"):
        artifact = os.path.join(args.out, f"{mode}.safetensors")
        config = merge_configs(manifest, artifact)["dam"]
        config["parameters"] = {**config["parameters"], "mode": mode, "retrain": True}
        models[f"dam:{mode}"] = os.path.join(args.out, f"merged-{mode}")
        _mergekit_yaml(config, os.path.join(args.out, f"{mode}.yml"), models[f"dam:{mode}"], quiet=True)
        with open(os.path.join(args.out, f"{mode}.report.json")) as handle:
            reports[mode] = json.load(handle)
    models["linear"] = os.path.join(args.out, "merged-linear")
    _mergekit_yaml(merge_configs(manifest, "")["linear"], os.path.join(args.out, "linear.yml"), models["linear"], quiet=True)
    experts = {f"expert:{s}": manifest["skills"][s]["expert"] for s in SKILLS}  # for retention
    results = score({"base": manifest["base"], **experts, **models}, Suite.from_lab(manifest))
    print(f"{'merge':16s}" + "".join(f"{s:>26s}" for s in SKILLS))
    for name in models:
        entry = results[name]
        print(f"{name:16s}" + "".join(
            f"{entry[s]['accuracy']:>8.2f} KL {entry[s]['kl']:5.2f} ret {entry['retention'][s]['nll']:5.2f}"
            for s in SKILLS))
    for mode, report in reports.items():
        print(f"{mode:12s} training {report['seconds']:.1f} s, peak RSS {report['peak_memory_bytes'] / 2**30:.2f} GiB, "
              f"held-out KL (calibration tail) {sum(report['held_out_kl']['final'].values()) / len(SKILLS):.3f} "
              f"(linear {sum(report['held_out_kl']['step_0_linear_average'].values()) / len(SKILLS):.3f})")
    with open(os.path.join(args.out, "layerwise_lab.json"), "w") as handle:
        json.dump({"results": results, "reports": {m: {k: r[k] for k in ("seconds", "peak_memory_bytes", "held_out_kl")} for m, r in reports.items()}}, handle, indent=1)


if __name__ == "__main__":
    main()
