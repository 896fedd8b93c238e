"""Charts of `compare` results and of `inspect`'s coefficient statistics, readable with many models.

`compare_chart(results, path, highlight)` takes compare.json's dict (as `compare.chart` does) and draws:
- one bar panel per metric that has values: exact match, KL(expert || model), the lm-eval scores
  (a compare run without experts has no KL, so no KL panel);
- with compute (`compare --compute`): mean exact match and mean KL over the skills against compute,
  log x, a model that cost 0 as a dashed horizontal line, each point or line labelled by name,
  the labels placed so that none overlaps another or a point.
Every merged model has one colour (and, past the palette, a hatch), the same in every panel. The
base and the experts are references, not bars: per skill a black line at the level of that skill's
own expert and a grey dashed one at the base's. A model is an expert when its name starts with
`expert_` or `expert:` or its retention is 1.0 on a skill (what compare writes for the skill's own
expert); its skill is the one with retention 1.0, else the one its name ends with. One legend, for
all panels, outside the axes.

`coefficient_chart.distinction_chart` draws what `inspect` says tells the experts apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from mergekit_dam.tools.harness import lm_eval_columns, lm_eval_label
from mergekit_dam.tools.labels import LABEL_SIZE, place_labels

EXPERT_PREFIXES = ("expert_", "expert:")
FONT_SIZE = 10
MARKERS = "osD^vP*Xph<>"
EXPERT_STYLE = dict(color="black", linestyle="-", linewidth=2.2)
BASE_STYLE = dict(color="0.45", linestyle="--", linewidth=1.6)


def skills_of(results: dict, names: Sequence[str]) -> List[str]:
    """The scored skills, in the order of the first model's entry."""
    skills: List[str] = []
    for name in names:
        for key, value in results[name].items():
            if isinstance(value, dict) and "nll" in value and key not in skills:
                skills.append(key)
    return skills


def model_names(results: dict, highlight: Optional[Sequence[str]] = None) -> List[str]:
    """The entries that are models (a results file may hold more, e.g. `times`, `settings`)."""
    names = list(highlight or results)
    return [n for n in names if isinstance(results.get(n), dict) and any(isinstance(v, dict) and "nll" in v for v in results[n].values())]


def _close(value, target: float) -> bool:
    return isinstance(value, (int, float)) and abs(value - target) < 1e-9


def expert_skill(results: dict, name: str, skills: Sequence[str]) -> Tuple[bool, Optional[str]]:
    """(is it an expert, the skill it is the expert of or None when unknown)."""
    retention = results[name].get("retention") or {}
    own = [s for s in skills if isinstance(retention.get(s), dict) and _close(retention[s].get("nll"), 1.0)
           and (retention[s].get("accuracy") is None or _close(retention[s]["accuracy"], 1.0))]
    by_name = name.startswith(EXPERT_PREFIXES)
    if len(own) == 1:
        return True, own[0]
    if by_name:
        suffix = name.split(":", 1)[1] if name.startswith("expert:") else name[len("expert_"):]
        return True, suffix if suffix in skills else None
    return False, None


def roles(results: dict, names: Sequence[str], skills: Sequence[str]) -> Dict[str, Tuple[str, Optional[str]]]:
    """{name: ("base", None) | ("expert", skill or None) | ("merge", None)}."""
    out = {}
    for name in names:
        if name == "base":
            out[name] = ("base", None)
            continue
        is_expert, skill = expert_skill(results, name, skills)
        out[name] = ("expert", skill) if is_expert else ("merge", None)
    return out


def palette(count: int) -> List[Tuple[str, Optional[str], str]]:
    """`count` distinct (face colour, hatch, hatch colour): tab20's dark half, then its light half
    hatched in the dark twin's colour (the greys left out: they are the base's), then the same
    faces again with other hatches."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    colours = [to_hex(c) for c in colormaps["tab20"].colors]
    darks = [c for i, c in enumerate(colours[0::2]) if i != 7]
    lights = [c for i, c in enumerate(colours[1::2]) if i != 7]
    base = [(c, None, c) for c in darks] + [(light, "////", dark) for light, dark in zip(lights, darks)]
    hatches = ["xx", "..", "\\\\\\\\", "++", "oo"]
    out = []
    for index in range(count):
        round_, slot = divmod(index, len(base))
        face, hatch, hatch_colour = base[slot]
        if round_ == 0:
            out.append((face, hatch, hatch_colour))
        else:  # past the palette: the same faces with other hatches, white on the dark ones
            out.append((face, hatches[(round_ - 1) % len(hatches)], hatch_colour if hatch else "white"))
    return out


def model_colours(names: Sequence[str]) -> Dict[str, Tuple[str, Optional[str], str]]:
    """One distinct (face colour, hatch, hatch colour) per name, in order."""
    return dict(zip(names, palette(len(names))))


def _value(results: dict, name: str, skill: str, metric: str):
    value = results[name].get(skill, {}).get(metric) if isinstance(results[name].get(skill), dict) else None
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _score(results: dict, name: str, task: str, metric: str):
    value = (results[name].get("lm_eval") or {}).get(task, {}).get(metric)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _has_values(results: dict, names: Sequence[str], skills: Sequence[str], metric: str) -> bool:
    return any(_value(results, n, s, metric) is not None for n in names for s in skills)


METRICS = {
    "accuracy": ("exact match", "exact match (higher is better)"),
    "kl": ("KL to the expert", "KL(expert || model) (lower is better)"),
    "nll": ("answer NLL", "answer NLL per token (lower is better)"),
}


@dataclass
class ChartPlan:
    """What the compare chart draws: who is a bar, who a reference, and which panels have values."""

    results: dict
    skills: List[str]
    merges: List[str]  # bars, one colour each
    unmapped: List[str]  # experts of no known skill: their own marks on every skill
    colours: Dict[str, Tuple[str, Optional[str], str]]
    experts: Dict[str, str]  # skill -> its expert
    base: Optional[str]
    bar_metrics: List[str]
    harness: List[Tuple[str, str]]  # lm-eval (task, metric) columns
    costed: List[str]  # merges with a compute figure
    compute_metrics: List[str]


def plan(results: dict, highlight: Optional[List[str]] = None) -> ChartPlan:
    names = model_names(results, highlight)
    if not names:
        raise ValueError("no model entries to draw")
    skills = skills_of(results, names)
    role = roles(results, names, skills)
    merges = [n for n in names if role[n][0] == "merge"]
    unmapped = [n for n in names if role[n] == ("expert", None)]
    bar_metrics = [m for m in ("accuracy", "kl") if _has_values(results, names, skills, m)] or ["nll"]
    with_harness = [n for n in names if results[n].get("lm_eval")]
    costed = [n for n in merges if isinstance(results[n].get("compute"), (int, float))]
    return ChartPlan(
        results, skills, merges, unmapped, model_colours(merges + unmapped),
        experts={role[n][1]: n for n in names if role[n][0] == "expert" and role[n][1] is not None},
        base=next((n for n in names if role[n][0] == "base"), None), bar_metrics=bar_metrics,
        harness=lm_eval_columns({n: results[n] for n in with_harness}) if with_harness else [], costed=costed,
        compute_metrics=[m for m in ("accuracy", "kl") if m in bar_metrics and _has_values(results, costed, skills, m)] if costed else [])


def build_figure(results: dict, highlight: Optional[List[str]] = None):
    """The compare chart as a matplotlib Figure (laid out and its labels placed; not saved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chart = plan(results, highlight)
    bar_panels = len(chart.bar_metrics) + (1 if chart.harness else 0)
    ticks = max(len(chart.skills), len(chart.harness))
    bar_width = min(11.0, max(5.0, 1.2 + 0.13 * max(1, len(chart.merges)) * ticks))
    width = max(bar_panels * bar_width, len(chart.compute_metrics) * 6.5) + 2.6
    rows = 1 + (1 if chart.compute_metrics else 0)
    with plt.rc_context({"font.size": FONT_SIZE, "axes.titlesize": FONT_SIZE + 1}):
        figure = plt.figure(figsize=(width, 4.6 * rows), dpi=120, layout="constrained")
        parts = figure.subfigures(rows, 1, squeeze=False)[:, 0] if rows > 1 else [figure]
        bar_axes = list(_axes(parts[0], bar_panels))
        for axis, metric in zip(bar_axes, chart.bar_metrics):
            _metric_panel(axis, chart, metric)
        if chart.harness:
            _harness_panel(bar_axes[len(chart.bar_metrics)], chart)
        compute_axes = list(_axes(parts[1], len(chart.compute_metrics))) if chart.compute_metrics else []
        for axis, metric in zip(compute_axes, chart.compute_metrics):
            _compute_panel(axis, chart, metric)
        figure.legend(handles=_legend_handles(chart), loc="outside right upper", fontsize=FONT_SIZE - 1, frameon=False,
                      title="models", title_fontsize=FONT_SIZE)
        if compute_axes:
            figure.canvas.draw()  # lay out first: the labels are placed in the final pixel positions
            figure.set_layout_engine("none")
            for axis in compute_axes:
                place_labels(axis, axis._dam_labels)
    return figure


def _metric_panel(axis, chart: ChartPlan, metric: str) -> None:
    """One metric's bars per skill, with the skill's expert and the base as reference lines."""
    results = chart.results
    _bars(axis, results, chart.merges, chart.skills, lambda n, s: _value(results, n, s, metric), chart.colours)
    _skill_references(axis, results, chart.skills, metric, chart.experts, chart.base)
    for name in chart.unmapped:  # an expert of no known skill: its own mark on every skill
        for index, skill in enumerate(chart.skills):
            value = _value(results, name, skill, metric)
            if value is not None:
                axis.hlines(value, index - 0.42, index + 0.42, color=chart.colours[name][0], linestyle="-.", linewidth=1.8, zorder=4)
    axis.set_title(METRICS[metric][1])
    axis.set_ylabel(METRICS[metric][0])


def _harness_panel(axis, chart: ChartPlan) -> None:
    columns = {lm_eval_label(task, metric, "\n"): (task, metric) for task, metric in chart.harness}
    _bars(axis, chart.results, chart.merges, list(columns), lambda n, label: _score(chart.results, n, *columns[label]), chart.colours)
    _harness_references(axis, chart.results, chart.harness, chart.experts, chart.unmapped, chart.base, chart.colours)
    axis.set_title("lm-eval scores")


def _axes(part, count: int):
    return part.subplots(1, count, squeeze=False)[0]


def _bars(axis, results, merges, ticks, value_of, colours) -> None:
    count = max(1, len(merges))
    width = 0.84 / count
    for index, name in enumerate(merges):
        face, hatch, hatch_colour = colours[name]
        positions, heights = [], []
        for tick_index, tick in enumerate(ticks):
            value = value_of(name, tick)
            if value is not None:
                positions.append(tick_index + (index - (count - 1) / 2) * width)
                heights.append(value)
        axis.bar(positions, heights, width, label=name, color=face, hatch=hatch, edgecolor="white" if not hatch else hatch_colour,
                 linewidth=0.4 if not hatch else 0, zorder=2, **({"hatchcolor": hatch_colour} if hatch else {}))
        zeros = [p for p, h in zip(positions, heights) if h == 0]
        if zeros:  # a 0 is a value, not a missing bar: a stub on the axis in the model's colour
            axis.hlines([0.0] * len(zeros), [p - width * 0.45 for p in zeros], [p + width * 0.45 for p in zeros],
                        colors=face, linewidth=3, clip_on=False, zorder=3)
    axis.set_xticks(range(len(ticks)), ticks)
    axis.set_xlim(-0.5, len(ticks) - 0.5)
    axis.grid(axis="y", alpha=0.3, zorder=0)


def _mark(axis, index: int, value, style: dict) -> None:
    if value is not None:
        axis.hlines(value, index - 0.46, index + 0.46, zorder=5, **style)


def _skill_references(axis, results, skills, metric, experts, base) -> None:
    for index, skill in enumerate(skills):
        expert = experts.get(skill)
        if expert is not None and metric != "kl":  # KL(expert || expert) is 0 by definition
            _mark(axis, index, _value(results, expert, skill, metric), EXPERT_STYLE)
        if base is not None:
            _mark(axis, index, _value(results, base, skill, metric), BASE_STYLE)


def _harness_references(axis, results, harness, experts, unmapped, base, colours) -> None:
    """An lm-eval task's reference is the expert of the skill its name contains, when one does."""
    for index, (task, metric) in enumerate(harness):
        for skill, expert in experts.items():
            if skill in task:
                _mark(axis, index, _score(results, expert, task, metric), EXPERT_STYLE)
        if base is not None:
            _mark(axis, index, _score(results, base, task, metric), BASE_STYLE)
        for name in unmapped:
            _mark(axis, index, _score(results, name, task, metric), dict(color=colours[name][0], linestyle="-.", linewidth=1.8))


def _mean(results, name, skills, metric) -> Optional[float]:
    values = [v for v in (_value(results, name, s, metric) for s in skills) if v is not None]
    return sum(values) / len(values) if values else None


def _compute_panel(axis, chart: ChartPlan, metric: str) -> None:
    """Mean `metric` over the skills against compute, each costed merge a labelled point (a line at 0)."""
    results, merges, skills, colours, experts, base = chart.results, chart.merges, chart.skills, chart.colours, chart.experts, chart.base
    labels = []
    for name in chart.costed:
        mean = _mean(results, name, skills, metric)
        if mean is None:
            continue
        face = colours[name][0]
        marker = MARKERS[merges.index(name) % len(MARKERS)]
        if results[name]["compute"] > 0:
            axis.scatter([results[name]["compute"]], [mean], color=face, marker=marker, s=46, label=name, zorder=4,
                         edgecolors="black", linewidths=0.5)
            labels.append((results[name]["compute"], mean, name, face, "point"))
        else:
            axis.axhline(mean, color=face, linestyle="--", linewidth=1.4, label=f"{name} (no search)", zorder=3)
            labels.append((None, mean, f"{name} (no search)", face, "line"))
    own = [_value(results, expert, skill, metric) for skill, expert in experts.items()]
    own = [v for v in own if v is not None]
    if own and metric != "kl":
        axis.axhline(sum(own) / len(own), zorder=2, **EXPERT_STYLE)
    if base is not None and _mean(results, base, skills, metric) is not None:
        axis.axhline(_mean(results, base, skills, metric), zorder=2, **BASE_STYLE)
    if any(results[name]["compute"] > 0 for name in chart.costed):
        axis.set_xscale("log")
    axis.set_xlabel("compute (forward-token equivalents, log); dashed: compute 0")
    axis.set_ylabel(f"mean {METRICS[metric][0]} over the skills")
    axis.set_title(f"mean {METRICS[metric][0]} vs compute ({'higher' if metric == 'accuracy' else 'lower'} is better)")
    axis.grid(alpha=0.3)
    if labels:
        low, high = min(l[1] for l in labels), max(l[1] for l in labels)
        margin = 0.18 * (high - low or max(abs(high), 1.0))
        bottom, top = axis.get_ylim()
        axis.set_ylim(min(bottom, low - margin), max(top, high + margin))
        points = [l[0] for l in labels if l[0] is not None]
        if points:
            left, right = axis.get_xlim()
            axis.set_xlim(left, right * (max(points) / min(points)) ** 0.15 if axis.get_xscale() == "log" else right)
    axis._dam_labels = labels


def _legend_handles(chart: ChartPlan):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = []
    if chart.experts:
        handles.append(Line2D([], [], label="each skill's own expert", **EXPERT_STYLE))
    if chart.base is not None:
        handles.append(Line2D([], [], label="base", **BASE_STYLE))
    for name in chart.unmapped:
        handles.append(Line2D([], [], label=name, color=chart.colours[name][0], linestyle="-.", linewidth=1.8))
    for name in chart.merges:
        face, hatch, hatch_colour = chart.colours[name]
        handles.append(Patch(facecolor=face, hatch=hatch, edgecolor=hatch_colour if hatch else face, linewidth=0,
                             label=name, **({"hatchcolor": hatch_colour} if hatch else {})))
    return handles


def compare_chart(results: dict, path: str, highlight: Optional[List[str]] = None) -> str:
    """The compare chart of `results` (compare.json's dict) to `path` (PNG); `highlight`: only
    these models. A drop-in replacement of compare.chart."""
    import matplotlib.pyplot as plt

    figure = build_figure(results, highlight)
    figure.savefig(path, dpi=figure.dpi)
    plt.close(figure)
    return path
