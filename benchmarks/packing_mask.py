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

from mergekit_dam.tools.lab import build
from mergekit_dam.training.data import collate


def micro_batch(count: int, width: int, seed: int):
    """`count` examples of 6-44 tokens (the lab's range): padded ids and mask; packed ids,
    position ids and 4D mask (first fit in rows of `width`); each example's (row, start, length)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [int(torch.randint(6, 45, (1,), generator=generator)) for _ in range(count)]
    examples = [torch.randint(3, 100, (n,), generator=generator).tolist() for n in lengths]
    padded_ids, padded_mask = collate(examples, pad_id=0)
    rows, places = [], []
    for k, n in sorted(enumerate(lengths), key=lambda item: -item[1]):
        row = next((r for r, used in enumerate(rows) if used + n <= width), len(rows))
        if row == len(rows):
            rows.append(0)
        places.append((k, row, rows[row], n))
        rows[row] += n
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    for k, row, start, n in places:
        ids[row, start : start + n] = torch.tensor(examples[k])
        positions[row, start : start + n] = torch.arange(n)
        segment[row, start : start + n] = k
    for row, used in enumerate(rows):  # the tail: one more (unscored) example, as packing.pack does
        positions[row, used:] = torch.arange(width - used)
        segment[row, used:] = count + row
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    mask4d = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
    return (padded_ids, padded_mask), (ids, positions, mask4d), places


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
    (padded_ids, padded_mask), (ids, positions, mask4d), places = micro_batch(args.examples, args.width, seed=0)
    ways = {
        "padded": {"input_ids": padded_ids, "attention_mask": padded_mask},
        "packed, position ids": {"input_ids": ids, "attention_mask": None, "position_ids": positions},
        "packed, 4D mask": {"input_ids": ids, "attention_mask": mask4d, "position_ids": positions},
    }
    ways = {name: {k: (v.to(device) if v is not None else None) for k, v in inputs.items()} for name, inputs in ways.items()}

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
                              for k, row, start, n in places)
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
              "padded_shape": list(padded_ids.shape), "packed_shape": list(ids.shape),
              "median_step_ms": {name: 1000 * t for name, t in times.items()},
              "ratio_to_padded": {name: t / times["padded"] for name, t in times.items()},
              "max_abs_logit_difference_to_padded": agreement}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
