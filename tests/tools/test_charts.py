"""The compare chart that stays readable with many models (tools/charts.py), and
benchmarks/charts.py, which redraws the documentation's PNGs from committed results
(tools/labels.py and tools/coefficient_chart.py have their own test files)."""

import importlib.util
import json
import os
import random
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import LineCollection, PathCollection  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.text import Annotation, Text  # noqa: E402

from mergekit_dam.tools.charts import build_figure, compare_chart, model_colours, roles  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
SCRIPT = os.path.join(ROOT, "benchmarks", "charts.py")
SKILLS = ["alpha", "beta", "gamma"]
REFERENCES = {"base", "expert_alpha", "expert_beta", "specialist"}


def synthetic(merges=15, kl=True, compute=True, lm_eval=False, seed=0):
    """compare.json's shape: a base, two experts named so, one (`specialist`, gamma's) known only
    by its retention, and `merges` merged models, several at the same compute (crowded labels)."""
    rng = random.Random(seed)

    def entry(accuracy, kls, retention):
        out = {s: {"nll": rng.uniform(0.1, 3), "ppl": 2.0, "accuracy": accuracy[i]} for i, s in enumerate(SKILLS)}
        if kl:
            for i, s in enumerate(SKILLS):
                out[s]["kl"] = kls[i]
        out["retention"] = retention
        return out

    results = {"base": entry([0.0] * 3, [3.0, 3.5, 2.5], {s: {"nll": 0.0, "accuracy": 0.0} for s in SKILLS})}
    for index, (name, skill) in enumerate([("expert_alpha", "alpha"), ("expert_beta", "beta"), ("specialist", "gamma")]):
        accuracy, kls = [0.0] * 3, [2.0] * 3
        accuracy[index], kls[index] = 0.9 + 0.03 * index, 0.0
        results[name] = entry(accuracy, kls, {s: ({"nll": 1.0, "accuracy": 1.0} if s == skill else {"nll": -0.1, "accuracy": 0.0}) for s in SKILLS})
    for index in range(merges):
        # merge_00 keeps alpha's exact match (accuracy retention 1.0) but not its NLL: a merge, not an expert
        retention = {s: {"nll": rng.uniform(0, 0.95), "accuracy": 1.0 if index == 0 else rng.uniform(0, 0.9)} for s in SKILLS}
        model = entry([rng.uniform(0, 0.85) for _ in SKILLS], [rng.uniform(0.2, 2.5) for _ in SKILLS], retention)
        if compute:
            model["compute"] = 0.0 if index % 4 == 3 else [1e6, 3e6, 1e7][index % 3]
        if lm_eval:
            model["lm_eval"] = {"dam_lab_alpha": {"exact_match,none": rng.uniform(0, 1)}, "mmlu": {"acc,none": rng.uniform(0.2, 0.5)}}
        results[f"merge_{index:02d}"] = model
    if lm_eval:
        for name in REFERENCES:
            results[name]["lm_eval"] = {"dam_lab_alpha": {"exact_match,none": 0.9 if name == "expert_alpha" else 0.0}, "mmlu": {"acc,none": 0.3}}
    return results


@pytest.fixture
def figure():
    made = []

    def build(results, highlight=None):
        made.append(build_figure(results, highlight))
        return made[-1]

    yield build
    for one in made:
        plt.close(one)


def drawn_colours(figure) -> dict:
    """{model: set of RGBA} over every bar, point and no-search line of every panel."""
    seen = {}
    for axis in figure.axes:
        for container in axis.containers:
            for patch in container.patches:
                seen.setdefault(container.get_label(), set()).add(to_rgba(patch.get_facecolor()))
        for collection in axis.collections:
            if isinstance(collection, PathCollection) and not collection.get_label().startswith("_"):
                seen.setdefault(collection.get_label(), set()).add(tuple(collection.get_facecolor()[0]))
        for line in axis.get_lines():
            if line.get_label().endswith(" (no search)"):
                seen.setdefault(line.get_label().removesuffix(" (no search)"), set()).add(to_rgba(line.get_color()))
    return seen


def panel_titles(figure) -> list:
    return [axis.get_title() for axis in figure.axes if axis.get_title()]


def test_the_chart_is_written(tmp_path):
    path = compare_chart(synthetic(), str(tmp_path / "chart.png"))
    with open(path, "rb") as handle:
        assert handle.read(4) == b"\x89PNG"
    assert os.path.getsize(path) > 20_000


def test_each_merge_has_its_own_colour_in_every_panel(figure):
    results = synthetic(15)
    drawn = figure(results)
    merges = [n for n in results if n not in REFERENCES]
    seen = drawn_colours(drawn)
    assert set(seen) == set(merges)
    assert all(len(colours) == 1 for colours in seen.values()), {n: c for n, c in seen.items() if len(c) > 1}
    assert len({next(iter(c)) for c in seen.values()}) == len(merges)  # 15 merges, 15 face colours
    # a merge is drawn in every panel: bars in the two bar panels, a point or a line in both compute panels
    assert len(panel_titles(drawn)) == 4
    for name in merges:
        bars = [a for a in drawn.axes if any(c.get_label() == name for c in a.containers)]
        assert len(bars) == 2, name


def test_colours_stay_distinct_past_the_palette():
    colours = model_colours([f"m{i}" for i in range(40)])
    assert len(set(colours.values())) == 40
    face_and_hatch = [(face, hatch) for face, hatch, _ in colours.values()]
    assert len(set(face_and_hatch)) == 40


def test_experts_and_the_base_are_reference_marks_not_bars(figure):
    results = synthetic(5)
    assert roles(results, list(results), SKILLS)["specialist"] == ("expert", "gamma")  # from its retention alone
    assert roles(results, list(results), SKILLS)["merge_00"] == ("merge", None)  # exact match kept, NLL not
    drawn = figure(results)
    bar_labels = {c.get_label() for a in drawn.axes for c in a.containers}
    assert not bar_labels & REFERENCES and "merge_00" in bar_labels
    exact = next(a for a in drawn.axes if a.get_title().startswith("exact match"))
    levels = {round(float(segment[0][1]), 6): (segment[0][0], segment[1][0])
              for collection in exact.collections if isinstance(collection, LineCollection) for segment in collection.get_segments()}
    for index, (name, skill) in enumerate([("expert_alpha", "alpha"), ("expert_beta", "beta"), ("specialist", "gamma")]):
        level = round(results[name][skill]["accuracy"], 6)
        assert level in levels, f"{name}'s mark on {skill}"
        low, high = levels[level]
        assert low < index < high  # drawn across its own skill's group only
    legend = [t.get_text() for t in drawn.legends[0].get_texts()]
    assert "each skill's own expert" in legend and "base" in legend and "expert_alpha" not in legend


def test_no_panel_for_a_metric_without_values(figure):
    titles = panel_titles(figure(synthetic(4, kl=False, compute=False)))
    assert titles == ["exact match (higher is better)"]
    titles = panel_titles(figure(synthetic(4, kl=False, compute=True)))
    assert len(titles) == 2 and not any("KL" in t for t in titles)
    text_only = synthetic(3, kl=False, compute=False)
    for name in text_only:
        for skill in SKILLS:
            text_only[name][skill]["accuracy"] = None
    assert panel_titles(figure(text_only)) == ["answer NLL per token (lower is better)"]  # something to look at still


def test_the_lm_eval_panel_is_kept(figure):
    drawn = figure(synthetic(6, lm_eval=True))
    assert "lm-eval scores" in panel_titles(drawn)
    panel = next(a for a in drawn.axes if a.get_title() == "lm-eval scores")
    assert [t.get_text() for t in panel.get_xticklabels()] == ["dam_lab_alpha\nexact_match", "mmlu\nacc"]


def test_the_legend_is_outside_the_axes(figure):
    drawn = figure(synthetic(15))
    drawn.canvas.draw()
    renderer = drawn.canvas.get_renderer()
    legend = drawn.legends[0].get_window_extent(renderer)
    assert legend.x0 >= max(axis.get_window_extent(renderer).x1 for axis in drawn.axes) - 0.5
    assert not any(axis.get_legend() for axis in drawn.axes)


def test_compute_panels_labels_do_not_collide(figure):
    drawn = figure(synthetic(15))
    drawn.canvas.draw()
    renderer = drawn.canvas.get_renderer()
    compute = [a for a in drawn.axes if "vs compute" in a.get_title()]
    assert len(compute) == 2 and all(a.get_xscale() == "log" for a in compute)
    for axis in compute:
        notes = [t for t in axis.texts if isinstance(t, Annotation)]
        assert len(notes) == 15  # every merge labelled
        assert sum(t.get_text().endswith("(no search)") for t in notes) == 3  # compute 0: a dashed line
        boxes = [Text.get_window_extent(t, renderer) for t in notes]  # the text, without its leader line
        frame = axis.get_window_extent(renderer)
        for i, a in enumerate(boxes):
            assert frame.x0 - 1 <= a.x0 and a.x1 <= frame.x1 + 1 and frame.y0 - 1 <= a.y0 and a.y1 <= frame.y1 + 1, notes[i].get_text()
            for j in range(i + 1, len(boxes)):
                b = boxes[j]
                overlap = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
                assert overlap < 1.0, (notes[i].get_text(), notes[j].get_text())


def test_highlight_draws_only_those_models(figure):
    results = synthetic(6)
    drawn = figure(results, ["base", "expert_alpha", "merge_01", "merge_02"])
    assert set(drawn_colours(drawn)) == {"merge_01", "merge_02"}


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_charts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_chart_reads_the_newest_train_steps(tmp_path):
    charts = load_script()

    def step(floor):
        return {"geometry": "1b", "teacher": "online", "experts": 3, "seq": 2048, "floor_s": {"median": floor, "min": floor, "max": floor},
                "variants": {"fused:weights": {"s": {"median": 2 * floor, "min": 2 * floor, "max": 2 * floor}, "ratio": 2.0}}}

    (tmp_path / "gpu_check_a.json").write_text(json.dumps({"date": "2026-11-26 10:00:00 UTC", "steps": {"train_step_1b_online": {"result": step(0.5)}}}))
    (tmp_path / "gpu_check_b.json").write_text(json.dumps({"date": "2026-11-26 22:00:00 UTC", "steps": {"train_step_1b_online": {"result": step(0.2)}}}))
    source, date, results = charts.newest_train_steps(str(tmp_path / "gpu_check_*.json"))
    assert os.path.basename(source) == "gpu_check_b.json" and date.startswith("2026-11-26 22")
    assert [r["floor_s"]["median"] for r in results] == [0.2]
    # the committed files: the table of BENCHMARKS.md's "GPU speed and memory (H200)" is part 4's
    source, _, results = charts.newest_train_steps()
    assert os.path.basename(source) == "gpu_check_2026-11-26_h200_part4.json"
    assert [(r["geometry"], r["teacher"]) for r in results] == [("7b", "online"), ("7b", "topk"), ("1b", "online"), ("1b", "topk")]


def test_the_script_redraws_the_documentation_charts_from_the_committed_results(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MPLBACKEND": "Agg"})
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("headline.png", "coefficients.png", "real_coefficients.png", "gpu_step_vs_floor.png"):
        with open(tmp_path / name, "rb") as handle:
            assert handle.read(4) == b"\x89PNG", name
        assert os.path.getsize(tmp_path / name) > 20_000, name


def test_the_headline_chart_is_the_readme_run():
    """README's table: the run of BENCHMARKS.md's second lent H200, DAM and the simple merges."""
    charts = load_script()
    results = json.load(open(charts.HEADLINE))
    assert {"dam", "ties", "dare_ties", "linear", "task_arithmetic_0.5"} <= set(results)
    assert round(results["dam"]["shift"]["accuracy"], 2) == 0.96 and round(results["ties"]["arithmetic"]["accuracy"], 2) == 0.30
