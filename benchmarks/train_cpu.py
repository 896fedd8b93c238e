"""CPU training-stage figures: seconds per step, tokens/s and peak memory of the real
training stage (the code path mergekit-yaml runs), on random experts of a given size.

    python benchmarks/train_cpu.py [--hidden 256 --layers 4 --seq 128 --batch 2 --steps 10]

Experts = one random base + small perturbations (tiny.make_family); every expert gets
the same generated text. Figures come from the training report.
"""

import argparse
import json
import os
import tempfile

from helpers import read_report
from mergekit.merge import MergeOptions

from mergekit_dam import train
from mergekit_dam.lab.tiny import make_family


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-recompute", dest="recompute", action="store_false", help="keep merged weights for backward")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        base, *experts = make_family(root, "llama", hidden=args.hidden, layers=args.layers)
        data = os.path.join(root, "data.txt")
        with open(data, "w") as handle:
            for i in range(64):
                handle.write(" ".join(f"word{(i * 7 + j) % 97}" for j in range(args.seq)) + "\n")
        config = {
            "merge_method": "dam", "base_model": base,
            "models": [{"model": m, "parameters": {"dataset": data}} for m in experts],
            "parameters": {"coefficients": os.path.join(root, "c.safetensors"), "steps": args.steps,
                           "max_length": args.seq, "batch_size": args.batch, "samples": 64, "recompute": args.recompute},
        }
        train(config, MergeOptions(quiet=True))
        report = read_report(os.path.join(root, "c.safetensors"))
    print(json.dumps({
        "geometry": vars(args),
        "seconds_total": report["seconds"],
        "seconds_per_step": report["seconds"] / report["steps"],
        "tokens_per_second": report["tokens_per_second"],
        "peak_rss_GiB": report["peak_memory_bytes"] / 2**30,
        "estimated_peak_GiB": report["estimate"]["peak_bytes"] / 2**30,
        "trainable_coefficients": report["trainable_coefficients"],
    }, indent=1))


if __name__ == "__main__":
    main()
