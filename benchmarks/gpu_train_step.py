"""Time DAM's real training step against the plain-model floor, in one run.

    python benchmarks/gpu_train_step.py --geometry 1b   [--teacher online|topk] [--json out.json]
    python benchmarks/gpu_train_step.py --geometry 7b
    python benchmarks/gpu_train_step.py --geometry tiny --device cpu   # numerics/smoke on CPU
    python benchmarks/gpu_train_step.py --geometry 1b --profile fused:weights   # + kernel tables (torch profiler)
    python benchmarks/gpu_train_step.py --variants plain:layer fused:layer fused:weights fused:none

Experts = one random base + small perturbations, built directly on the device in bf16
(N experts, batch 1 sequence of `--seq` tokens per expert). The DAM step is one step of the
training loop itself (`loop.fit`: the mode's `micro_batch_loss`, backward, the host sync,
clipping and the AdamW step), the code path `mergekit-yaml` runs. The
floor, measured first in the same process on the same device with one plain bf16 HF
model of the same geometry: online teachers N x (fwd+bwd) + N x fwd; top-K teachers
N x (fwd+bwd). Each variant KERNELS:RECOMPUTE (kernels `plain` or `fused`, recompute
`layer`, `weights` or `none`) is timed on the same view and stacks, one change at a time.
Reports medians (and spread) after warm-up, peak memory, and ratios; the JSON is
rewritten after each variant, so a run cut short keeps what it measured.
"""

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
from helpers import GEOMETRIES
from tqdm.auto import tqdm

from mergekit_dam import DamSettings
from mergekit_dam.core.kernels import plain_kernels
from mergekit_dam.training.data import Batch
from mergekit_dam.training.loop import Problem, fit
from mergekit_dam.training.merged_model import MergedModel
from mergekit_dam.training.modes.end_to_end import micro_batch_loss
from mergekit_dam.training.skeleton import build_skeleton
from mergekit_dam.training.teachers import make_teacher

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


class StepClock:
    """The training loop's per-step hooks (`begin`, and the `select` protocol: over_budget,
    after_step, finish), used only to read the clock: each step's device-synchronised time."""

    def __init__(self, device):
        self.device, self.marks = device, []

    def start(self, optimizer):
        sync(self.device)
        self.marks.append(time.perf_counter())
        return None  # not a resumed run

    def over_budget(self) -> bool:
        return False

    def after_step(self, step: int, spent: bool = False) -> bool:
        sync(self.device)
        self.marks.append(time.perf_counter())
        return False

    def finish(self) -> None:
        pass

    def seconds(self) -> list:
        return [later - earlier for earlier, later in zip(self.marks, self.marks[1:])]


def peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


KERNEL_KINDS = (  # by kernel name, for the share of each kind of work in a step
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "aten::mm", "aten::addmm", "aten::bmm")),
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("reduction", ("reduce", "sum", "softmax", "norm")),
)


def kernel_table(fn, device, rows: int = 30) -> dict:
    """One call of `fn` under the torch profiler: the top kernels by time on the device
    (on CPU: ops by self time), each with its share of the total, and the share of each
    kind of work (matmul, attention, reduction, other elementwise)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    # on a GPU only the kernels themselves: an aten op's device time repeats its kernels'
    events = [e for e in prof.key_averages() if not cuda or e.device_type == DeviceType.CUDA]
    attribute = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(event, attribute) for event in events)
    kinds = {}
    for event in events:
        lowered = event.key.lower()
        kind = next((name for name, marks in KERNEL_KINDS if any(mark in lowered for mark in marks)), "other elementwise")
        kinds[kind] = kinds.get(kind, 0.0) + getattr(event, attribute) / max(total, 1e-9)
    top = sorted(events, key=lambda event: getattr(event, attribute), reverse=True)[:rows]
    return {"total_ms": total / 1e3, "kinds": kinds,
            "top": [{"name": event.key, "ms": getattr(event, attribute) / 1e3, "calls": event.count,
                     "share": getattr(event, attribute) / max(total, 1e-9)} for event in top]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--geometry", choices=GEOMETRIES, default="1b")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--teacher", choices=("online", "topk"), default="online")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", nargs="+", default=["fused:weights"], help="KERNELS:RECOMPUTE, kernels plain|fused, recompute layer|weights|none")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--profile", metavar="VARIANT", help="add the kernel tables of one floor call and one step of VARIANT")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, MistralConfig

    device = torch.device(args.device)
    dtype = torch.bfloat16
    config = MistralConfig(**GEOMETRIES[args.geometry], max_position_embeddings=max(4096, args.seq), sliding_window=None,
                           tie_word_embeddings=False, attn_implementation="sdpa")
    n, seq = args.experts, args.seq
    ids = torch.randint(0, config.vocab_size, (n, seq), device=device)
    mask = torch.ones_like(ids)

    # the floor: one plain bf16 model of the same geometry
    reset_peak(device)
    with torch.device(device):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)

    def floor():
        for row in range(n):
            plain(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]).logits.float().sum().backward()
        if args.teacher == "online":
            with torch.no_grad():
                for row in range(n):
                    plain(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1])
        plain.zero_grad(set_to_none=True)

    floor_times = timed(floor, device, args.warmup, args.repeats)
    floor_peak = peak(device)
    floor_profile = kernel_table(floor, device) if args.profile else None
    base = {name: p.detach().clone() for name, p in plain.named_parameters()}
    plain = None  # freed before the DAM variants (the floor closure is not called again)

    # DAM: N experts = base + perturbations, stacked once; fp32 coefficients; the trainer's step
    reset_peak(device)
    generator = torch.Generator(device=device).manual_seed(0)
    stacks = {}
    for name, weight in base.items():
        stack = weight.unsqueeze(0).repeat(n, *([1] * weight.ndim))
        stack.add_(torch.randn(stack.shape, generator=generator, device=device, dtype=dtype) * 1e-3)
        stacks[name] = stack
    del base
    reset_peak(device)  # the peak of training, not of building the stacks from the base's copy
    view = MergedModel(build_skeleton(config, device), stacks)
    params = list(view.raw_parameters().values())
    settings = DamSettings(batch_size=1, teacher=args.teacher, topk=128, lr=1e-3, checkpoint_minutes=0)
    experts = list(range(n))
    batch = Batch([0] * n, ids, mask)  # row i: expert i's sequence 0
    teacher = make_teacher(settings, lambda i, b: view.expert_logits(i, b.ids.to(device), b.mask.to(device)), device)
    for index in experts:  # top-K: cached here, before the timed steps
        teacher.prepare(index, [batch.rows(index, index + 1, device)])

    def micro_batch(step, micro):
        loss, kls = micro_batch_loss(view, experts, batch, teacher, settings, device)
        return loss, batch.mask.sum(), kls

    def dam_steps(count: int) -> list:
        """Seconds of each of `count` steps of one run of the training loop."""
        clock = StepClock(device)
        fit(Problem(params, count, micro_batch), settings, tqdm(disable=True), begin=clock.start, select=clock)
        return clock.seconds()

    def dam_step():
        dam_steps(1)

    floor_median = statistics.median(floor_times)
    result = {
        "geometry": args.geometry, "experts": n, "seq": seq, "teacher": args.teacher, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "floor_s": {"median": floor_median, "min": min(floor_times), "max": max(floor_times)},
        "floor_peak_GiB": floor_peak / 2**30, "variants": {},
    }
    print(f"{args.geometry} x{n}, seq {seq}, {args.teacher} teachers on {result['gpu'] or device}")
    print(f"  floor            median {floor_median:.4f} s  (min {min(floor_times):.4f}, max {max(floor_times):.4f})  peak {floor_peak / 2**30:.2f} GiB", flush=True)
    profiles = {"floor": floor_profile} if args.profile else {}
    for variant in [*args.variants, *([args.profile] if args.profile and args.profile not in args.variants else [])]:
        kernels, view.recompute = variant.split(":")
        reset_peak(device)
        try:
            with plain_kernels() if kernels == "plain" else contextlib.nullcontext():
                times = dam_steps(args.warmup + args.repeats)[args.warmup:] if variant in args.variants else None
                if variant == args.profile:
                    profiles[variant] = kernel_table(dam_step, device)
        except Exception as error:  # out of memory, or a kernel that fails: the other variants still run
            for param in params:
                param.grad = None
            result["variants"][variant] = {"status": f"{type(error).__name__}: {str(error)[:300]}", "peak_GiB": peak(device) / 2**30}
            print(f"  {variant:16s} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
            continue
        if times:
            entry = {"s": {"median": statistics.median(times), "min": min(times), "max": max(times)},
                     "ratio": statistics.median(times) / floor_median, "peak_GiB": peak(device) / 2**30}
            result["variants"][variant] = entry
            print(f"  {variant:16s} median {entry['s']['median']:.4f} s  (min {entry['s']['min']:.4f}, max {entry['s']['max']:.4f})  "
                  f"peak {entry['peak_GiB']:.2f} GiB  ratio {entry['ratio']:.2f}x", flush=True)
        if profiles:
            result["profile"] = profiles
        if args.json:
            with open(args.json + ".tmp", "w") as handle:
                json.dump(result, handle, indent=1)
            os.replace(args.json + ".tmp", args.json)
    for name, table in profiles.items():
        print(f"  {name}: {table['total_ms']:.1f} ms of device time; "
              + ", ".join(f"{kind} {share:.0%}" for kind, share in sorted(table["kinds"].items(), key=lambda kv: -kv[1])))
        for row in table["top"][:12]:
            print(f"    {row['share']:6.1%} {row['ms']:9.2f} ms {row['calls']:6d}x  {row['name'][:90]}")


if __name__ == "__main__":
    main()
