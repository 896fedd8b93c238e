"""Peak device memory of layer-wise vs end-to-end training at a real geometry.

    python benchmarks/layerwise_peak.py --geometry 7b --device cuda --workdir /tmp/lw7b
    python benchmarks/layerwise_peak.py --geometry tiny --device cpu --workdir /tmp/lwtiny   # smoke

Writes N random experts of the geometry (Mistral-style, bf16 safetensors) and a calibration
file of `--samples` sequences of `--seq` tokens per expert, then runs the real training
stage (`mergekit_dam.train`, the `mergekit-yaml` code path) once per mode, `--steps` steps.
On CUDA the peak is torch.cuda.max_memory_allocated for that run; on CPU, the process's
peak RSS. An end-to-end run whose pre-training estimate exceeds free memory stops with the
trainer's own error, reported as "does not fit". 3 x 7B experts take 42 GB of disk.
"""

import argparse
import json
import os
import sys

import torch
from helpers import GEOMETRIES, read_report
from mergekit.merge import MergeOptions

from mergekit_dam import DamError, train
from mergekit_dam.lab.tiny import make_tokenizer


def write_experts(workdir: str, geometry: str, n: int, device: str) -> list:
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(**GEOMETRIES[geometry], max_position_embeddings=4096, tie_word_embeddings=False)
    tokenizer = make_tokenizer()
    paths = []
    for index in range(n):
        path = os.path.join(workdir, f"expert_{index}")
        paths.append(path)
        if os.path.exists(os.path.join(path, "config.json")):
            continue
        torch.manual_seed(index)
        with torch.device(device):  # random init on the GPU takes seconds, not minutes
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path, max_shard_size="5GB")
        tokenizer.save_pretrained(path)
        del model
    return paths


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--geometry", choices=GEOMETRIES, default="7b")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", nargs="+", default=["layerwise", "end_to_end"])
    parser.add_argument("--workdir", default="/tmp/dam-layerwise-peak")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    experts = write_experts(args.workdir, args.geometry, args.experts, args.device)
    data = os.path.join(args.workdir, "data.jsonl")
    with open(data, "w") as handle:
        for index in range(args.samples + 2):  # + the held-out tail
            handle.write(json.dumps({"text": ("the quick brown fox %d jumps over the lazy dog. " % index) * (args.seq // 40 + 1)}) + "\n")
    size = sum(os.path.getsize(os.path.join(e, f)) for e in experts for f in os.listdir(e) if f.endswith(".safetensors"))
    print(f"{args.experts} x {args.geometry} experts, {size / 2**30:.1f} GiB of bf16 weights in all, seq {args.seq}")
    results = {}
    for mode in args.modes:
        artifact = os.path.join(args.workdir, f"{mode}.safetensors")
        config = {"merge_method": "dam", "dtype": "bfloat16",
                  "models": [{"model": e, "parameters": {"dataset": data}} for e in experts],
                  "parameters": {"coefficients": artifact, "mode": mode, "steps": args.steps, "samples": args.samples + 2,
                                 "max_length": args.seq, "train_device": args.device, "train_dtype": "bfloat16", "retrain": True}}
        try:
            train(config, MergeOptions(quiet=True))
        except DamError as error:
            results[mode] = {"fits": False, "error": str(error)}
            print(f"{mode:12s} does not fit: {error}")
            continue
        report = read_report(artifact)
        results[mode] = {"fits": True, "peak_GiB": report["peak_memory_bytes"] / 2**30, "seconds": report["seconds"],
                         "tokens_per_second": report["tokens_per_second"]}
        estimate = (report.get("estimate") or {}).get("peak_bytes")
        results[mode]["recompute"] = (report.get("estimate") or {}).get("recompute")
        if estimate:  # the pre-training estimate against what the run measured
            results[mode].update(estimate_GiB=estimate / 2**30, estimate_over_peak=estimate / report["peak_memory_bytes"])
        print(f"{mode:12s} peak {results[mode]['peak_GiB']:.2f} GiB"
              + (f" (estimate {results[mode]['estimate_GiB']:.2f} GiB)" if estimate else "")
              + f", {report['seconds']:.1f} s in all, {report['tokens_per_second']:.0f} tokens/s")
    with open(os.path.join(args.workdir, "layerwise_peak.json"), "w") as handle:
        json.dump({"geometry": args.geometry, "experts": args.experts, "seq": args.seq, "weights_GiB": size / 2**30, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
