"""Choose DAM's lab hyperparameters on the VALIDATION split (never the held-out one).

    python benchmarks/tune_dam_lab.py --lab dam-demo/lab --out /tmp/dam-tune

For each candidate (changes to demo.DAM_LAB_SETTINGS), trains DAM on the calibration
data, merges with run_merge, and scores the merge on every skill's validation split:
mean exact-match accuracy and mean KL to the skill's expert. Prints a table, writes JSON.
"""

import argparse
import json
import os

from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge

from mergekit_dam.lab import SKILLS, build
from mergekit_dam.lab.demo import DAM_LAB_SETTINGS, merge_configs
from mergekit_dam.tools.compare import Suite, score

CANDIDATES = [
    {},
    {"lr": 0.003},
    {"lr": 0.03},
    {"steps": 400},
    {"temperature": 1.0},
    {"similarity_weight": 0.0},
    {"train_norms": False, "train_embeddings": False},
    {"steps": 400, "lr": 0.03},
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lab", default="dam-demo/lab")
    parser.add_argument("--out", default="/tmp/dam-tune")
    parser.add_argument("--candidates", help="JSON list of setting changes (default: the built-in grid)")
    args = parser.parse_args()
    candidates = json.loads(args.candidates) if args.candidates else CANDIDATES
    manifest = build(args.lab)
    validation = Suite(
        skills={s: manifest["skills"][s]["validation"] for s in SKILLS},
        experts={s: manifest["skills"][s]["expert"] for s in SKILLS},
    )
    rows = []
    for index, change in enumerate(candidates):
        artifact = os.path.join(args.out, f"candidate{index}.safetensors")
        config = merge_configs(manifest, artifact)["dam"]
        config["parameters"] = {**config["parameters"], **change}
        out = os.path.join(args.out, f"merged{index}")
        run_merge(MergeConfiguration.model_validate(config), out, MergeOptions(quiet=True))
        result = score({"dam": out}, validation)["dam"]
        rows.append({"change": change, "accuracy": sum(result[s]["accuracy"] for s in SKILLS) / len(SKILLS),
                     "kl": sum(result[s]["kl"] for s in SKILLS) / len(SKILLS),
                     "per_skill": {s: (result[s]["accuracy"], result[s]["kl"]) for s in SKILLS}})
        print(f"{json.dumps(change):48s} validation accuracy {rows[-1]['accuracy']:.3f}  KL {rows[-1]['kl']:.3f}", flush=True)
    with open(os.path.join(args.out, "tune.json"), "w") as handle:
        json.dump({"base_settings": DAM_LAB_SETTINGS, "candidates": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
