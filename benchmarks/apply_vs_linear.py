"""Apply-stage wall time of `dam` vs `linear` on the same models, same process, same machine.

    python benchmarks/apply_vs_linear.py [--hidden 1024 --layers 8 --vocab 32000] [--repeats 5] [--cuda]

Builds (once, cached in --workdir) a base and three experts of a Llama geometry in
bfloat16, writes a DAM artifact of random per-column coefficients, then alternates
run_merge(dam) and run_merge(linear) and reports the median wall time of each and
their ratio. Interpreter start-up and imports are excluded (timed in-process).
"""

import argparse
import json
import os
import statistics
import time

import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
from safetensors import safe_open

from mergekit_dam import write_artifact  # (importing the package registers dam)


def build(workdir, hidden, layers, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = [os.path.join(workdir, name) for name in ("base", "expert_1", "expert_2", "expert_3")]
    if all(os.path.exists(os.path.join(p, "config.json")) for p in paths):
        return paths
    config = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                         vocab_size=vocab, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for index, path in enumerate(paths):
        if index:
            model.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in base.items()})
        model.save_pretrained(path, safe_serialization=True)
    return paths


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/dam-bench-apply")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args()

    base, *experts = build(args.workdir, args.hidden, args.layers, args.vocab)
    artifact = os.path.join(args.workdir, "coefficients.safetensors")
    with safe_open(os.path.join(experts[0], "model.safetensors"), "pt") as handle:
        shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
    generator = torch.Generator().manual_seed(0)
    write_artifact(artifact, {n: torch.rand(3, s[-1], generator=generator) for n, s in shapes.items()}, experts)
    params = sum(torch.Size(s).numel() for s in shapes.values())

    dam = {"merge_method": "dam", "models": [{"model": m} for m in experts],
           "parameters": {"coefficients": artifact}, "dtype": "bfloat16"}
    configs = {
        "dam": dam,
        # base_model as DAM's skeleton: mergekit also loads the base's tensors (weight 0)
        "dam_with_base": {**dam, "base_model": base},
        "linear": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in experts],
                   "dtype": "bfloat16"},
    }
    options = MergeOptions(quiet=True, cuda=args.cuda, copy_tokenizer=False, write_model_card=False)
    times = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, config in configs.items():
            out = os.path.join(args.workdir, f"out-{name}")
            start = time.perf_counter()
            run_merge(MergeConfiguration.model_validate(config), out, options)
            if args.cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "params_per_model": params, "device": "cuda" if args.cuda else f"cpu ({os.cpu_count()} cores)",
        "seconds": times, "median_s": median, "ratio_dam_to_linear": median["dam"] / median["linear"],
        "ratio_dam_with_base_to_linear": median["dam_with_base"] / median["linear"],
    }
    with open(os.path.join(args.workdir, "apply_vs_linear.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"{params / 1e6:.0f}M params per model, {result['device']}, {args.repeats} alternating repeats")
    for name, values in times.items():
        print(f"  {name:14s} median {median[name]:.2f} s  (min {min(values):.2f}, max {max(values):.2f})"
              f"  ratio to linear {median[name] / median['linear']:.2f}")


if __name__ == "__main__":
    main()
