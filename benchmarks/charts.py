"""The documentation's charts, redrawn from the committed results files (no model runs):

    python benchmarks/charts.py [--out docs/images]

  headline.png           the compare chart of README's headline result: BENCHMARKS.md, "The real
                         chat model on an H200", DAM and the simple merges from the same experts
                         (real_model_smollm2_h200_dam_2026-11-26/results.json)
  coefficients.png       what `inspect` says tells the experts apart in DAM's coefficients (dominance,
                         spread, row correlation; mean over tensors) for the lab runs of
                         lab_parametrization_2026-11-26.json and lab_conflict_2026-11-27/ (seed 0)
  real_coefficients.png  `inspect`'s heatmap (mean coefficient per layer, module type and expert) of
                         the DAM run of BENCHMARKS.md's first real-model peers setup, from its
                         committed inspect output (peers_real_smollm2_2026-12-03_run2/dam.inspect.json)
  gpu_step_vs_floor.png  DAM's training step against the plain-model floor measured in the same
                         run, per geometry, teachers and kernels/recompute setting: the newest
                         train-step results among benchmarks/results/gpu_check_*.json
  evolution.png          the compare chart of BENCHMARKS.md's "DAM against evolutionary merging"
                         (the recipe-1 lab; evolution_2026-11-26/compare.json)

Every number drawn is read from those files.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))

from mergekit_dam.tools.charts import FONT_SIZE, LABEL_SIZE, compare_chart, model_names
from mergekit_dam.tools.coefficient_chart import distinction_chart
from mergekit_dam.tools.inspect_artifact import heatmap

RESULTS = os.path.join(HERE, "results")
HEADLINE = os.path.join(RESULTS, "real_model_smollm2_h200_dam_2026-11-26", "results.json")
EVOLUTION = os.path.join(RESULTS, "evolution_2026-11-26", "compare.json")
# inspect's statistics of the lab's DAM runs: the two parametrisations, then the experts merged
# four, three and two at a time (seed 0 of each set)
PARAMETRIZATION = os.path.join(RESULTS, "lab_parametrization_2026-11-26.json")
EXPERT_SETS = [os.path.join(RESULTS, "lab_conflict_2026-11-27", name + ".json") for name in
               ("defaults_seed0_rerun", "arithmetic_translate_brackets", "shift_arithmetic_brackets", "shift_arithmetic", "shift_translate")]
SEED = "s0"
GPU_CHECKS = os.path.join(RESULTS, "gpu_check_*.json")
REAL_INSPECT = os.path.join(RESULTS, "peers_real_smollm2_2026-12-03_run2", "dam.inspect.json")


def read(path: str):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def headline(out: str) -> str:
    results = read(HEADLINE)
    return compare_chart({name: results[name] for name in model_names(results)}, os.path.join(out, "headline.png"))


def evolution(out: str) -> str:
    return compare_chart(read(EVOLUTION), os.path.join(out, "evolution.png"))


def _experts(stats: dict) -> str:
    return " + ".join(m.removeprefix("expert_") for m in stats["dominance"] if m != "base")


def coefficient_runs() -> Tuple[List[Tuple[str, dict]], List[int]]:
    """(row label, inspect statistics) per run, and the rows where a new group starts."""
    runs = [(f"parametrization: {name.replace('_', ' ')}", stats) for name, stats in read(PARAMETRIZATION)["coefficients"].items()]
    groups = [len(runs)]
    for path in EXPERT_SETS:
        stats = read(path)["coefficients"][SEED]
        runs.append((_experts(stats), stats))
    return runs, groups


def coefficients(out: str) -> str:
    runs, groups = coefficient_runs()
    return distinction_chart(runs, os.path.join(out, "coefficients.png"), groups=groups,
                             title="What tells the experts apart in DAM's coefficients (mergekit-dam inspect, mean over tensors; the merge lab)")


def real_coefficients(out: str) -> str:
    summary = read(REAL_INSPECT)
    for grid in ("layers", "dominance"):  # JSON made the layer indices strings
        summary[grid] = {kind: {int(layer): values for layer, values in layers.items()} for kind, layers in summary[grid].items()}
    return heatmap(summary, os.path.join(out, "real_coefficients.png"),
                   title="DAM's coefficients on SmolLM2-135M-Instruct, three chat experts: mean per layer (mergekit-dam inspect)")


# ---------------------------------------------------------------------------------------------
# the GPU step against its floor


def train_steps(node, date: Optional[str] = None, found: Optional[list] = None) -> list:
    """(date, result) of every train-step result in a gpu_check JSON (a result has `floor_s` and
    `variants`); date: the nearest enclosing `date`."""
    found = [] if found is None else found
    if isinstance(node, dict):
        date = node.get("date", date) if isinstance(node.get("date"), str) else date
        if "floor_s" in node and "variants" in node:
            found.append((date or "", node))
            return found
        for value in node.values():
            train_steps(value, date, found)
    elif isinstance(node, list):
        for value in node:
            train_steps(value, date, found)
    return found


def newest_train_steps(pattern: str = GPU_CHECKS) -> Tuple[str, str, List[dict]]:
    """(file, date, results) of the newest run of train steps among the files: one result per
    geometry and teachers."""
    runs = [(date, path, result) for path in sorted(glob.glob(pattern)) for date, result in train_steps(read(path))]
    if not runs:
        raise SystemExit(f"no train-step results in {pattern}")
    date, path = max((date, path) for date, path, _ in runs)
    results: Dict[Tuple[str, str], dict] = {}
    for run_date, run_path, result in runs:
        if (run_date, run_path) == (date, path):
            results.setdefault((result["geometry"], result["teacher"]), result)
    order = sorted(results, key=lambda key: (-_size(key[0]), key[1] != "online"))
    return path, date, [results[key] for key in order]


def _size(geometry: str) -> float:
    try:
        return float(geometry.rstrip("bB"))
    except ValueError:
        return 0.0


TEACHERS = {"online": "online teachers", "topk": "top-K teachers"}
VARIANT_ORDER = ("plain:layer", "fused:layer", "fused:weights", "fused:none")


def gpu_chart(path: str, source: str, date: str, results: List[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in VARIANT_ORDER if any(v in r["variants"] for r in results)]
    variants += sorted({v for r in results for v in r["variants"]} - set(variants))
    colours = {v: matplotlib.colormaps["tab10"](i) for i, v in enumerate(variants)}
    columns = 2 if len(results) > 1 else 1
    rows = -(-len(results) // columns)
    with plt.rc_context({"font.size": FONT_SIZE}):
        figure, axes = plt.subplots(rows, columns, figsize=(6.4 * columns, 4.3 * rows), dpi=120, layout="constrained", squeeze=False)
        for axis, result in zip(axes.flat, results):
            floor = result["floor_s"]
            names = ["floor"] + [v for v in variants if v in result["variants"]]
            stats = [floor] + [result["variants"][v]["s"] for v in names[1:]]
            medians = [s["median"] for s in stats]
            errors = [[s["median"] - s["min"] for s in stats], [s["max"] - s["median"] for s in stats]]
            bars = axis.bar(range(len(names)), medians, 0.68, yerr=errors, capsize=3, error_kw={"linewidth": 0.9, "ecolor": "0.25"},
                            color=["0.6"] + [colours[v] for v in names[1:]], zorder=2)
            axis.axhline(floor["median"], color="0.35", linestyle="--", linewidth=1, zorder=1)
            top = max(s["max"] for s in stats)
            for index, (bar, name) in enumerate(zip(bars, names)):
                x = bar.get_x() + bar.get_width() / 2
                if name == "floor":
                    text = f"{floor['median']:.3f} s"
                    if "floor_peak_GiB" in result:
                        text += f"\n{result['floor_peak_GiB']:.1f} GiB"
                else:
                    variant = result["variants"][name]
                    ratio = variant.get("ratio", variant["s"]["median"] / floor["median"])
                    text = f"{ratio:.3f}×" if ratio < 1.1 else f"{ratio:.2f}×"
                    if "peak_GiB" in variant:
                        text += f"\n{variant['peak_GiB']:.1f} GiB"
                axis.text(x, stats[index]["max"] + top * 0.02, text, ha="center", va="bottom", fontsize=LABEL_SIZE + 1,
                          fontweight="bold" if name != "floor" else "normal")
            axis.set_ylim(0, top * 1.3)
            axis.set_xticks(range(len(names)), ["floor"] + [name.replace(":", "\n") for name in names[1:]], fontsize=LABEL_SIZE + 1)
            axis.set_xlabel("DAM: kernels / recompute", fontsize=LABEL_SIZE + 1)
            axis.set_ylabel("seconds per step (median; bars: min–max)")
            axis.set_title(f"{result['geometry'].upper()} geometry, {result['experts']} experts, {TEACHERS.get(result['teacher'], result['teacher'])}, "
                           f"seq {result['seq']}", fontsize=FONT_SIZE)
            axis.grid(axis="y", alpha=0.3, zorder=0)
        for axis in list(axes.flat)[len(results):]:
            axis.axis("off")
        gpu = results[0].get("gpu", "GPU")
        figure.suptitle(f"DAM's training step against the floor (one plain bf16 model, the same passes) measured in the same run\n"
                        f"{gpu}, {date}, {os.path.basename(source)}; labels: step / floor and peak GPU memory", fontsize=FONT_SIZE + 1)
        figure.savefig(path, dpi=figure.dpi)
    plt.close(figure)
    return path


def gpu_step_vs_floor(out: str) -> str:
    source, date, results = newest_train_steps()
    return gpu_chart(os.path.join(out, "gpu_step_vs_floor.png"), source, date, results)


CHARTS = {"headline": headline, "coefficients": coefficients, "real_coefficients": real_coefficients, "gpu_step_vs_floor": gpu_step_vs_floor, "evolution": evolution}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "docs", "images"), help="folder of the PNGs (default docs/images)")
    parser.add_argument("--only", nargs="*", choices=sorted(CHARTS), help="draw only these charts")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name in args.only or CHARTS:
        print(CHARTS[name](args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
