"""One forward and backward of the lab's model on a micro-batch of short examples, three ways:
padded, packed with position ids (transformers' packed-sequence format, which `packing` uses:
the model finds the example boundaries itself, one device sync per forward), and packed with
an explicit block-diagonal causal 4D mask (no detection). The logits of the three are compared,
each timed as the median of `--repeats` steps (taken in turn) after a warm-up, on any device.

    python benchmarks/packing_mask.py --lab dam-lab --device cuda --out /tmp/packing_mask.json

Why: on an H200 `packing: on` made the lab 1.48x slower than padding (BENCHMARKS.md, "Packing
on a GPU"); if the 4D mask removes that, packing can be the default on GPUs too.
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from mergekit_dam.lab import build
from mergekit_dam.training.data import Batch, Example
from mergekit_dam.training.packing import pack


def micro_batch(count: int, width: int, seed: int):
    """`count` examples of 6-44 tokens (the lab's range), padded (Batch.of) and packed as
    training packs them (packing.pack, rows of `width`), and the packed rows' block-diagonal
    causal 4D mask: a position sees the earlier positions of its own example, whose start is
    where the position ids restart at 0 (the row's padding tail counts as one more example)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [int(torch.randint(6, 45, (1,), generator=generator)) for _ in range(count)]
    examples = [Example(torch.randint(3, 100, (n,), generator=generator).tolist()) for n in lengths]
    padded, packed = Batch.of(examples, range(count), pad_id=0), pack(examples, range(count), width, pad_id=0)
    segment = (packed.position_ids == 0).cumsum(dim=1)
    causal = torch.tril(torch.ones(packed.ids.shape[1], packed.ids.shape[1], dtype=torch.bool))
    mask4d = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
    return padded, packed, mask4d


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lab", default="dam-lab")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--examples", type=int, default=68, help="examples per micro-batch (the lab: 17 per expert x 4)")
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    manifest = build(os.path.abspath(args.lab), progress=False)
    model = AutoModelForCausalLM.from_pretrained(manifest["base"], dtype=dtype).to(device)
    padded, packed, mask4d = micro_batch(args.examples, args.width, seed=0)
    ways = {
        "padded": padded.inputs(device),
        "packed, position ids": packed.inputs(device),  # what training passes
        "packed, 4D mask": {**packed.inputs(device), "attention_mask": mask4d.to(device)},
    }

    def step(inputs):
        logits = model(**inputs, use_cache=False).logits
        logits.float().pow(2).mean().backward()
        return logits.detach()

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    logits = {name: step(inputs) for name, inputs in ways.items()}
    agreement = {}
    for name in ("packed, position ids", "packed, 4D mask"):  # each example's logits against its padded row
        agreement[name] = max(float((logits[name][row, start : start + n].float() - logits["padded"][k, :n].float()).abs().max())
                              for k, ((row, start), n) in enumerate(zip(packed.places, padded.mask.sum(dim=1).tolist())))
    for inputs in ways.values():  # warm-up
        for _ in range(5):
            step(inputs)
    samples = {name: [] for name in ways}
    for _ in range(args.repeats):  # round robin: drift in the machine's speed hits every way alike
        for name, inputs in ways.items():
            synchronize()
            begin = time.perf_counter()
            step(inputs)
            synchronize()
            samples[name].append(time.perf_counter() - begin)
    times = {name: statistics.median(values) for name, values in samples.items()}
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
              "torch": torch.__version__, "dtype": str(dtype), "examples": args.examples,
              "padded_shape": list(padded.ids.shape), "packed_shape": list(packed.ids.shape),
              "median_step_ms": {name: 1000 * t for name, t in times.items()},
              "ratio_to_padded": {name: t / times["padded"] for name, t in times.items()},
              "max_abs_logit_difference_to_padded": agreement}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
