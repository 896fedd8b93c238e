"""The host-side cost of a DAM step: what bounds a small model's training on a GPU.

    python benchmarks/step_overhead.py [--layers 30 --records 512 --steps 60]

A Llama of SmolLM2-135M's tensor count (30 layers, 272 tensors) but hidden size 32, so
that the arithmetic is negligible and what is left is the per-step work of the host:
Python, the stock model's eager forward, one launch per operation, and the validation
passes. 3 experts and a base, `records` short records per expert, one thread, the real
training stage (the code path mergekit-yaml runs). On an H200 the real 135M model ran at
the same order of seconds per step with the GPU 14% busy (BENCHMARKS.md), so this
figure, measured on a CPU, follows what a GPU run of a small model spends.
"""

import argparse
import json
import os
import tempfile

import torch
from helpers import read_report
from mergekit.merge import MergeOptions

from mergekit_dam import train
from mergekit_dam.lab.tiny import make_family


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        base, *experts = make_family(root, "llama", hidden=32, layers=args.layers)
        data = os.path.join(root, "data.txt")
        with open(data, "w") as handle:
            for i in range(args.records):
                handle.write(" ".join(f"w{(i * 7 + j) % 97}" for j in range(8)) + "\n")
        config = {"merge_method": "dam", "base_model": base,
                  "models": [{"model": m, "parameters": {"dataset": data}} for m in experts],
                  "parameters": {"coefficients": os.path.join(root, "c.safetensors"), "steps": args.steps, "lr": 0.01,
                                 "max_length": 64, "batch_size": 3, "samples": args.records, "seed": 0}}
        train(config, MergeOptions(quiet=True))
        report = read_report(os.path.join(root, "c.safetensors"))
    print(json.dumps({"geometry": vars(args), "seconds": round(report["seconds"], 2),
                      "seconds_per_step": round(report["seconds"] / report["steps"], 4),
                      "tokens_per_second": round(report["tokens_per_second"])}))


if __name__ == "__main__":
    main()
