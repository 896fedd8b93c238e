"""The merge and its coefficient gradient alone, at 7B shapes: the plain PyTorch path
(kernels.py), the Triton kernels (fused.py), optionally one torch.compile expression
each, and the memory floor.

    python benchmarks/merge_kernels.py [--compile] [--json out.json]   # on a GPU
    python benchmarks/merge_kernels.py --device cpu --scale 64          # smoke: shapes / 64

Per weight shape of Mistral-7B, N = 3 bf16 experts, fp32 coefficients:
  forward   W = sum_i c_i[None, :] * W_i  (bf16 out, fp32 accumulation)
  backward  dL/dc_i = sum_rows dL/dW * W_i  (fp32 out)
The floor of each is its bytes (N + 1 bf16 tensors) over the device-to-device copy
bandwidth measured in the same run. A 7B step with recompute runs the forward twice and
the backward once per weight; the last line adds that up per step for each version.
"""

import argparse
import json
import statistics
import time

import torch

from mergekit_dam.core.kernels import (
    ColumnMerge,
    coefficient_grad,
    fused_for,
    merge_stack,
    plain_kernels,
)

# (rows, columns, tensors per 7B model)
SHAPES_7B = [(4096, 4096, 64), (1024, 4096, 64), (14336, 4096, 64), (4096, 14336, 32), (32000, 4096, 2)]


def fused_forward(coefficients, experts):
    return (coefficients[:, None, :] * experts.float()).sum(0).to(experts.dtype)


def fused_backward(grad, experts):
    return (grad.float()[None] * experts.float()).sum(1)


def eager_forward(coefficients, experts):
    with plain_kernels():
        return merge_stack(coefficients, experts)


def eager_backward(coefficients, experts, grad):
    """ColumnMerge's own backward, as autograd runs it, on the plain path."""
    class Context:
        saved_tensors = (coefficients, experts)

    with plain_kernels():
        return ColumnMerge.backward(Context(), grad)[0]


def median_ms(fn, device, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, repeats) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    source = torch.randn(2**28 // 4 if device.type == "cpu" else 2**30, device=device)
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source), device, repeats)
    return 2 * source.numel() * source.element_size() / (ms / 1e3)


TILES = [(16, 128, 4), (32, 128, 4), (64, 128, 4), (32, 256, 4), (64, 256, 8), (16, 512, 4), (128, 128, 8)]


def sweep(device, n, repeats, bandwidth, generator) -> list:
    """The Triton kernels' time over tile shapes (rows, columns, warps), on the 7B MLP shape."""
    from mergekit_dam.core import fused

    rows, columns = 14336, 4096
    experts = torch.randn(n, rows, columns, device=device, generator=generator).to(torch.bfloat16)
    coefficients = torch.rand(n, columns, device=device, generator=generator)
    grad = torch.randn(rows, columns, device=device, generator=generator).to(torch.bfloat16)
    floor = (n + 1) * rows * columns * 2 / bandwidth * 1e3
    out = []
    for tile in TILES:
        entry = {"tile": tile, "floor_ms": floor}
        for name, call in (("merge_ms", lambda: fused.merge_stack(coefficients, experts, tile)),
                           ("grad_ms", lambda: fused.coefficient_grad(grad, experts, tile))):
            try:
                entry[name] = median_ms(call, device, repeats)
            except Exception as error:  # a tile the compiler refuses
                entry[name] = f"{type(error).__name__}: {str(error)[:200]}"
        out.append(entry)
        print(f"tile {tile}: merge {entry['merge_ms']} ms, grad {entry['grad_ms']} ms, floor {floor:.3f} ms", flush=True)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--scale", type=int, default=1, help="divide every shape by this (smoke runs)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time one torch.compile expression each")
    parser.add_argument("--sweep", action="store_true", help="also time the Triton kernels over a few tile shapes")
    parser.add_argument("--json")
    args = parser.parse_args()
    device, n = torch.device(args.device), args.experts
    bandwidth = copy_bandwidth(device, args.repeats)
    forwards = {"eager": eager_forward}
    backwards = {"eager": lambda c, e, g: eager_backward(c, e, g)}
    if device.type == "cuda" and fused_for(torch.empty(2, 2, 2, device=device)) is not None:
        forwards["triton"] = merge_stack
        backwards["triton"] = lambda c, e, g: coefficient_grad(g, e, torch.float32)
    if args.compile:
        forward_c, backward_c = torch.compile(fused_forward, dynamic=True), torch.compile(fused_backward, dynamic=True)
        forwards["compiled"] = forward_c
        backwards["compiled"] = lambda c, e, g: backward_c(g, e)
    rows_out, per_step = [], {**{version: 0.0 for version in forwards}, "floor": 0.0}
    generator = torch.Generator(device=device).manual_seed(0)
    for rows, columns, count in SHAPES_7B:
        rows, columns = max(8, rows // args.scale), max(8, columns // args.scale)
        experts = torch.randn(n, rows, columns, device=device, generator=generator).to(torch.bfloat16)
        coefficients = torch.rand(n, columns, device=device, generator=generator)
        grad = torch.randn(rows, columns, device=device, generator=generator).to(torch.bfloat16)
        reference_w = (coefficients.double()[:, None, :] * experts.double()).sum(0)
        reference_g = (grad.double()[None] * experts.double()).sum(1)

        def error(value, reference):
            return float((value.double() - reference).norm() / reference.norm())

        row = {"shape": [rows, columns], "per_model": count}
        row["forward_error"] = {v: error(f(coefficients, experts), reference_w) for v, f in forwards.items()}
        row["backward_error"] = {v: error(b(coefficients, experts, grad), reference_g) for v, b in backwards.items()}
        row["forward_ms"] = {v: median_ms(lambda: f(coefficients, experts), device, args.repeats) for v, f in forwards.items()}
        row["backward_ms"] = {v: median_ms(lambda: b(coefficients, experts, grad), device, args.repeats) for v, b in backwards.items()}
        floor = (n + 1) * rows * columns * 2 / bandwidth * 1e3
        row["floor_ms"] = floor
        for version in forwards:
            per_step[version] += count * (2 * row["forward_ms"][version] + row["backward_ms"][version])
        per_step["floor"] += count * 3 * floor
        rows_out.append(row)
        print(f"{rows:6d} x {columns:6d}  floor {floor:7.3f} ms | "
              + " | ".join(f"{v}: merge {row['forward_ms'][v]:7.3f} grad {row['backward_ms'][v]:7.3f} "
                           f"(errors {row['forward_error'][v]:.1e}, {row['backward_error'][v]:.1e})" for v in forwards), flush=True)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; per 7B step with recompute (2 merges + 1 gradient per weight): "
          + ", ".join(f"{v} {ms:.0f} ms" for v, ms in per_step.items()))
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "experts": n, "scale": args.scale,
              "copy_bandwidth_TBps": bandwidth / 1e12, "shapes": rows_out, "per_7b_step_ms": per_step}
    if args.sweep and "triton" in forwards:
        result["sweep"] = sweep(device, n, args.repeats, bandwidth, generator)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
