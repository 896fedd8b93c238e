"""A copy of the lab whose experts keep only the largest entries of their task vectors (TIES's
trim, per tensor, by magnitude: mergekit's own `sparsify.magnitude`), to see whether sparser task vectors interfere less under DAM:

    python benchmarks/trimmed_lab.py --lab dam-lab --density 0.5 --out /tmp/lab-trimmed-0.5
    python benchmarks/lab_variants.py --lab /tmp/lab-trimmed-0.5 --out /tmp/v --variant t:defaults,seed=0

The copy shares the lab's base, data and recipe; only the experts' weights change (so they
are DAM's teachers as well as its inputs).
"""

import argparse
import json
import os
import shutil

from mergekit.sparsify import magnitude
from safetensors.torch import load_file, save_file

from mergekit_dam.lab import build, fingerprint


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lab", default="dam-lab")
    parser.add_argument("--density", type=float, required=True, help="share of each task vector's entries kept (0-1]")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    source = os.path.abspath(args.lab)
    manifest = build(source, progress=False)
    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("dam_coefficients*"))
    base = load_file(os.path.join(manifest["base"], "model.safetensors"))
    for entry in manifest["skills"].values():
        expert = load_file(os.path.join(entry["expert"], "model.safetensors"))
        trimmed = {name: (base[name] + magnitude(tensor - base[name], args.density)).contiguous() for name, tensor in expert.items()}
        save_file(trimmed, os.path.join(entry["expert"].replace(source, out), "model.safetensors"), metadata={"format": "pt"})
    copy = json.loads(json.dumps(manifest).replace(source, out))  # the copy's paths
    copy["fingerprint"] = fingerprint(copy)  # its own tensors: not the reference build's
    with open(os.path.join(out, "lab.json"), "w") as handle:
        json.dump(copy, handle, indent=1)
    print(out)


if __name__ == "__main__":
    main()
